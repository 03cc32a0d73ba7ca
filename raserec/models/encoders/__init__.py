"""Sequence encoders: padded item ids [B, T] -> user representation [B, d]."""

from raserec.models.encoders.base import SequenceEncoder
from raserec.models.encoders.sasrec import SASRec

__all__ = ["SASRec", "SequenceEncoder"]
