"""Stage 1: collaborative pre-training (learn to recommend and to retrieve)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from raserec.checkpoint import RECORD_KEY, encoder_record
from raserec.data.batch import PretrainBatch, SequenceBatch
from raserec.errors import ConfigError, check
from raserec.evaluation.module import RecommenderModule
from raserec.models.encoders.base import SequenceEncoder
from raserec.models.encoders.sasrec import SASRec
from raserec.pretrain.objectives import (
    Cloze,
    NextItemCE,
    Objective,
    SameTargetInfoNCE,
    objective_from_record,
)

#: ``none``: plain next-item training (SASRec baseline); ``same_target``: the paper's pair (the
#: sequence and a same-target sequence); ``dropout_and_same_target``: the authors' DuoRec "us_x"
#: pair (a second dropout pass of the sequence and a same-target sequence).
PositivePair = Literal["none", "same_target", "dropout_and_same_target"]

#: ``next_item``: L_rec is the next-item cross-entropy of the user representation; ``cloze``: L_rec
#: is the encoder's masked-item loss ``encoder.cloze_loss(input_ids, target)`` (BERT4Rec).
Objective_ = Literal["next_item", "cloze"]


def default_objectives(positive_pair: PositivePair, objective: Objective_, lambda_ret: float, temperature: float,
                       similarity: Literal["dot", "cos"]) -> list[Objective]:
    """The objectives the flat settings describe: L_rec (next-item CE or cloze), plus the
    same-target InfoNCE weighted ``lambda_ret`` unless ``positive_pair`` is ``none`` or the weight 0."""
    rec: Objective = Cloze() if objective == "cloze" else NextItemCE()
    if positive_pair == "none" or lambda_ret == 0:
        return [rec]
    return [rec, SameTargetInfoNCE(lambda_ret, temperature, similarity,
                                   dropout_view=positive_pair == "dropout_and_same_target")]


class PretrainModule(RecommenderModule):
    """Trains an encoder with a weighted sum of objectives (L_rec + lambda * L_ret by default) and
    saves it in a self-describing checkpoint.

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
        objectives: the loss terms as objects (:mod:`raserec.pretrain.objectives`, e.g.
            ``class_path: raserec.pretrain.objectives.SameTargetInfoNCE``); given, they replace
            the ones ``positive_pair``, ``objective``, ``lambda_ret``, ``temperature`` and
            ``similarity`` describe. A new objective is a new class.
        kwargs: the optimiser and evaluation settings every module shares (``lr``,
            ``weight_decay``, ``metric_ks``, ``mask_history``, ``predict_top_n``); see
            :class:`~raserec.evaluation.module.RecommenderModule`.
    """

    def __init__(
        self,
        num_items: int,
        encoder: Callable[[int], SequenceEncoder] = SASRec,
        positive_pair: PositivePair = "dropout_and_same_target",
        objective: Objective_ = "next_item",
        lambda_ret: float = 0.1,
        temperature: float = 1.0,
        similarity: Literal["dot", "cos"] = "dot",
        objectives: list[Objective] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check(lambda_ret >= 0, f"lambda_ret must be >= 0, got {lambda_ret}")
        if positive_pair not in ("none", "same_target", "dropout_and_same_target"):
            raise ConfigError(f"unknown positive_pair {positive_pair!r}")
        if objective not in ("next_item", "cloze"):
            raise ConfigError(f"unknown objective {objective!r}")
        if objectives is None:
            objectives = default_objectives(positive_pair, objective, lambda_ret, temperature, similarity)
        objectives = [objective_from_record(o) for o in objectives]
        if not objectives:
            raise ConfigError("objectives: at least one objective is needed")
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise ConfigError(f"objectives: two terms share a log name ({names})")
        self.save_hyperparameters(ignore=["encoder"])
        self.save_shared_hyperparameters()
        self.hparams["objectives"] = [o.record() for o in objectives]  # plain data in the checkpoint
        self.encoder = encoder(num_items)
        for o in objectives:
            if isinstance(o, Cloze) and not callable(getattr(self.encoder, "cloze_loss", None)):
                raise ConfigError(f"objective 'cloze' needs an encoder with cloze_loss(); "
                                  f"{type(self.encoder).__name__} has none")
        self.objectives = objectives
        # Learnable parts of objectives (e.g. SRA-CL's synthesiser): trained and checkpointed with
        # the module; the encoder record holds only the encoder.
        built = {o.name: o.build(self.encoder) for o in objectives}
        self.objective_modules = torch.nn.ModuleDict({k: m for k, m in built.items() if m is not None})

    @property
    def uses_positives(self) -> bool:
        """Whether training batches need same-target positives (the datamodule attaches them)."""
        return any(o.needs_positives and o.weight > 0 for o in self.objectives)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and dm is not None:
            for o in self.objectives:
                o.setup(dm)

    def user_representation(self, batch: SequenceBatch) -> Tensor:
        return self.encoder(batch["input_ids"])

    def item_weights(self) -> Tensor:
        return self.encoder.item_weights()

    def training_step(self, batch: PretrainBatch, batch_idx: int) -> Tensor:
        b = batch["input_ids"].size(0)
        active = [o for o in self.objectives if o.weight > 0]
        views: dict[str, Tensor] = {}
        for o in active:
            for name, ids in o.views(batch).items():
                views.setdefault(name, ids)  # a shared view name shares its pass
        reprs: dict[str, Tensor] = {}
        if views:
            # One encoder call for all views: dropout masks are drawn per row, so this equals
            # separate passes, at a fraction of the overhead.
            sizes = [v.size(0) for v in views.values()]
            reprs = dict(zip(views, self.encoder(torch.cat(list(views.values()))).split(sizes), strict=True))
        terms = {o.name: o.loss(self.encoder, batch, reprs) for o in active}
        loss = sum(o.weight * terms[o.name] for o in active)
        logged = {"train/loss": loss}
        if len(terms) > 1:
            logged.update({f"train/{name}": value for name, value in terms.items()})
        self.log_dict(logged, prog_bar=True, batch_size=b)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[RECORD_KEY] = encoder_record(self.encoder, self._data_fingerprint())

    def _data_fingerprint(self) -> dict[str, Any]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "data"):
            return {"num_items": self.hparams.num_items}
        return {"num_items": dm.num_items, "content_hash": dm.data.content_hash(), "max_len": dm.max_len,
                "data_path": str(dm.data_path)}
