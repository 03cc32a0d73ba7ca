"""Stage 1: collaborative pre-training (learn to recommend and to retrieve)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from raserec.checkpoint import RECORD_KEY, encoder_record
from raserec.data.batch import PretrainBatch, SequenceBatch
from raserec.errors import ConfigError, check, check_optimizer
from raserec.evaluation.module import RecommenderModule
from raserec.models.encoders.base import SequenceEncoder
from raserec.models.encoders.sasrec import SASRec
from raserec.models.losses import info_nce, next_item_loss

#: ``none``: plain next-item training (SASRec baseline); ``same_target``: the paper's pair (the
#: sequence and a same-target sequence); ``dropout_and_same_target``: the authors' DuoRec "us_x"
#: pair (a second dropout pass of the sequence and a same-target sequence).
PositivePair = Literal["none", "same_target", "dropout_and_same_target"]

#: ``next_item``: L_rec is the next-item cross-entropy of the user representation; ``cloze``: L_rec
#: is the encoder's masked-item loss ``encoder.cloze_loss(input_ids, target)`` (BERT4Rec).
Objective = Literal["next_item", "cloze"]


class PretrainModule(RecommenderModule):
    """Trains an encoder with L_rec + lambda * L_ret and saves it in a self-describing checkpoint.

    Args:
        num_items: number of real items (linked from the datamodule by the CLI).
        encoder: the backbone, built as ``encoder(num_items)`` (``class_path`` + ``init_args``).
        positive_pair: which positive pair L_ret uses (``none`` disables L_ret).
        objective: L_rec: ``next_item`` (cross-entropy of the next item) or ``cloze`` (the
            encoder's masked-item loss over the sequence with its target appended; needs an
            encoder with ``cloze_loss``, e.g. BERT4Rec).
        lambda_ret: weight of L_ret.
        temperature: InfoNCE temperature tau.
        similarity: ``dot`` (the paper) or ``cos``.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        metric_ks: cut-offs of HR@K and NDCG@K.
        mask_history: exclude already-seen items from the ranking.
        predict_top_n: items per user written by ``raserec predict``.
    """

    def __init__(
        self,
        num_items: int,
        encoder: Callable[[int], SequenceEncoder] = SASRec,
        positive_pair: PositivePair = "dropout_and_same_target",
        objective: Objective = "next_item",
        lambda_ret: float = 0.1,
        temperature: float = 1.0,
        similarity: Literal["dot", "cos"] = "dot",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        metric_ks: Sequence[int] = (5, 10, 20, 50),
        mask_history: bool = False,
        predict_top_n: int = 10,
    ) -> None:
        super().__init__(metric_ks=metric_ks, mask_history=mask_history, predict_top_n=predict_top_n)
        check_optimizer(lr, weight_decay)
        check(temperature > 0, f"temperature must be > 0 (it divides the similarities), got {temperature}")
        check(lambda_ret >= 0, f"lambda_ret must be >= 0, got {lambda_ret}")
        if positive_pair not in ("none", "same_target", "dropout_and_same_target"):
            raise ConfigError(f"unknown positive_pair {positive_pair!r}")
        self.save_hyperparameters(ignore=["encoder"])
        if objective not in ("next_item", "cloze"):
            raise ConfigError(f"unknown objective {objective!r}")
        self.encoder = encoder(num_items)
        if objective == "cloze" and not callable(getattr(self.encoder, "cloze_loss", None)):
            raise ConfigError(f"objective 'cloze' needs an encoder with cloze_loss(); "
                             f"{type(self.encoder).__name__} has none")
        self.objective = objective
        self.positive_pair = positive_pair
        self.lambda_ret = lambda_ret if positive_pair != "none" else 0.0
        self.temperature = temperature
        self.similarity = similarity
        self.lr = lr
        self.weight_decay = weight_decay

    @property
    def uses_positives(self) -> bool:
        return self.lambda_ret > 0

    def user_representation(self, batch: SequenceBatch) -> Tensor:
        return self.encoder(batch["input_ids"])

    def item_weights(self) -> Tensor:
        return self.encoder.item_weights()

    def training_step(self, batch: PretrainBatch, batch_idx: int) -> Tensor:
        ids = batch["input_ids"]
        b = ids.size(0)
        if not self.uses_positives:
            loss = self._rec_loss(ids, batch["target"])
            self.log("train/loss", loss, prog_bar=True, batch_size=b)
            return loss
        if "positive_ids" not in batch:
            raise RuntimeError(
                "positive_pair needs same-target positives: set `data.positives: true` in the config"
            )
        views = [ids, batch["positive_ids"]]
        if self.positive_pair == "dropout_and_same_target" and self.objective == "next_item":
            # An independent dropout pass of the same sequence. (With ``cloze`` L_rec does not
            # use a pass of the sequence, so its one pass is already independent of L_rec.)
            views.insert(1, ids)
        # One encoder call for all views: dropout masks are drawn per row, so this equals
        # separate passes, at a fraction of the overhead.
        reprs = self.encoder(torch.cat(views)).split(b)
        loss_rec = self._rec_loss(ids, batch["target"], reprs[0])
        keep = batch["has_positive"]
        loss_ret = info_nce(reprs[-2][keep], reprs[-1][keep], self.temperature, self.similarity)
        loss = loss_rec + self.lambda_ret * loss_ret
        self.log_dict(
            {"train/loss": loss, "train/loss_rec": loss_rec, "train/loss_ret": loss_ret},
            prog_bar=True, batch_size=b,
        )
        return loss

    def _rec_loss(self, ids: Tensor, target: Tensor, h: Tensor | None = None) -> Tensor:
        """L_rec of the batch; ``h`` is the sequences' representation when already computed."""
        if self.objective == "cloze":
            return self.encoder.cloze_loss(ids, target)
        return next_item_loss(self.encoder(ids) if h is None else h, self.item_weights(), target)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[RECORD_KEY] = encoder_record(self.encoder, self._data_fingerprint())

    def _data_fingerprint(self) -> dict[str, Any]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "data"):
            return {"num_items": self.hparams.num_items}
        return {"num_items": dm.num_items, "content_hash": dm.data.content_hash(), "max_len": dm.max_len,
                "data_path": str(dm.data_path)}
