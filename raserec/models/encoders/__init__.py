"""Sequence encoders: padded item ids [B, T] -> user representation [B, d]."""

from raserec.models.encoders.base import SequenceEncoder
from raserec.models.encoders.bert4rec import BERT4Rec
from raserec.models.encoders.gru4rec import GRU4Rec
from raserec.models.encoders.sasrec import SASRec

__all__ = ["BERT4Rec", "GRU4Rec", "SASRec", "SequenceEncoder"]
