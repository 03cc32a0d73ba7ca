"""Pre-training objectives as objects: each term of the loss is a class, injected into
:class:`~raserec.pretrain.module.PretrainModule`, so a new objective (another contrastive pair,
another recommendation loss) adds a class, not a branch.

An objective names the encoder inputs (*views*) it needs; the module encodes every distinct view
of a batch in one encoder call (dropout masks are drawn per row, so this equals separate passes
at a fraction of the overhead) and hands each objective the representations by name. Two
objectives that name the same view share its pass (the SASRec CE and the paper's same-target
InfoNCE both read ``sequence``); a view with another name is an independent dropout pass.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from raserec.data.batch import PretrainBatch
from raserec.errors import ConfigError, check
from raserec.models.encoders.base import SequenceEncoder
from raserec.models.losses import info_nce, next_item_loss, sample_negatives, target_first_bce

if TYPE_CHECKING:
    from raserec.data.datamodule import SequenceDataModule

#: The modules an objective recorded in a checkpoint may come from (checkpoints never import
#: arbitrary code).
TRUSTED_MODULES = ("raserec.pretrain.objectives", "raserec.semantic.sracl")


class Objective(ABC):
    """One weighted term of the pre-training loss.

    Args:
        weight: weight of this term in the total loss.
    """

    #: Name under which the term is logged (``train/<name>``).
    name = "loss"
    #: Whether the batch must carry same-target positives (``positive_ids``, ``has_positive``).
    needs_positives = False

    def __init__(self, weight: float = 1.0) -> None:
        check(weight >= 0, f"{type(self).__name__} weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def views(self, batch: PretrainBatch) -> dict[str, Tensor]:
        """Encoder inputs this objective reads, by view name (``{}``: none); a view may have any
        number of rows (e.g. ``k`` neighbours per sequence)."""
        return {}

    def build(self, encoder: SequenceEncoder) -> nn.Module | None:
        """Learnable parts of this objective (trained with the encoder, saved in the training
        checkpoint, not in the encoder record); ``None``: it has none."""
        return None

    def setup(self, datamodule: SequenceDataModule) -> None:
        """Read what the objective needs from the training data (e.g. neighbour tables);
        the built-in recommendation and same-target objectives need nothing."""
        return None

    @abstractmethod
    def loss(self, encoder: SequenceEncoder, batch: PretrainBatch, reprs: dict[str, Tensor]) -> Tensor:
        """The unweighted term, from the batch and the representations of the views."""

    def init_args(self) -> dict[str, Any]:
        return {"weight": self.weight}

    def record(self) -> dict[str, Any]:
        """Plain description stored in checkpoints: class path and arguments."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.init_args() == self.init_args()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]


class NextItemCE(Objective):
    """L_rec of SASRec and RaSeRec: full-softmax cross-entropy of the sequence's representation
    against its next item."""

    name = "loss_rec"

    def views(self, batch: PretrainBatch) -> dict[str, Tensor]:
        return {"sequence": batch["input_ids"]}

    def loss(self, encoder: SequenceEncoder, batch: PretrainBatch, reprs: dict[str, Tensor]) -> Tensor:
        return next_item_loss(reprs["sequence"], encoder.item_weights(), batch["target"])


class SampledBCE(Objective):
    """L_rec of the Ada-Retrieval authors' base models (github ll0ruc/Ada-Retrieval,
    ``reco_abc.py``): binary cross-entropy of the next item (label 1) and ``num_negatives``
    items drawn uniformly, with replacement, among those neither in the input sequence nor the
    target (label 0), averaged over the ``1 + n`` scores. Unlike the authors' it uses no learned
    per-item bias, so the encoder record stays a plain encoder.

    Args:
        weight: weight of this term.
        num_negatives: sampled negatives per sequence (the authors' 100), redrawn every step.
    """

    name = "loss_rec"

    def __init__(self, weight: float = 1.0, num_negatives: int = 100) -> None:
        super().__init__(weight)
        check(num_negatives >= 1, f"num_negatives must be >= 1, got {num_negatives}")
        self.num_negatives = int(num_negatives)

    def init_args(self) -> dict[str, Any]:
        return {"weight": self.weight, "num_negatives": self.num_negatives}

    def views(self, batch: PretrainBatch) -> dict[str, Tensor]:
        return {"sequence": batch["input_ids"]}

    def loss(self, encoder: SequenceEncoder, batch: PretrainBatch, reprs: dict[str, Tensor]) -> Tensor:
        target = batch["target"]
        num_items = encoder.item_embedding.num_embeddings - 1
        negatives = sample_negatives(batch["input_ids"], target, num_items, self.num_negatives)
        candidates = torch.cat([target.unsqueeze(1), negatives], dim=1)  # [B, 1 + n] item ids
        logits = torch.einsum("bd,bcd->bc", reprs["sequence"], encoder.item_embedding(candidates))
        return target_first_bce(logits).mean()


class Cloze(Objective):
    """L_rec of BERT4Rec: the encoder's masked-item loss over the sequence with its target
    appended (``encoder.cloze_loss``); it reads no view."""

    name = "loss_rec"

    def loss(self, encoder: SequenceEncoder, batch: PretrainBatch, reprs: dict[str, Tensor]) -> Tensor:
        cloze = getattr(encoder, "cloze_loss", None)
        if not callable(cloze):
            raise ConfigError(f"the Cloze objective needs an encoder with cloze_loss(); {type(encoder).__name__} "
                              "has none")
        return cloze(batch["input_ids"], batch["target"])


class SameTargetInfoNCE(Objective):
    """L_ret of RaSeRec: in-batch InfoNCE between a sequence and a training sequence with the same
    next item (DuoRec's supervised positive), over the pairs that have one.

    Args:
        weight: lambda, the weight of L_ret.
        temperature: InfoNCE temperature tau (divides the similarities).
        similarity: ``dot`` (the paper) or ``cos``.
        dropout_view: anchor on a second, independent dropout pass of the sequence (the authors'
            DuoRec "us_x"); ``False`` anchors on the ``sequence`` view that L_rec also reads (the
            paper's pair).
    """

    name = "loss_ret"
    needs_positives = True

    def __init__(self, weight: float = 0.1, temperature: float = 1.0, similarity: Literal["dot", "cos"] = "dot",
                 dropout_view: bool = True) -> None:
        super().__init__(weight)
        check(temperature > 0, f"temperature must be > 0 (it divides the similarities), got {temperature}")
        if similarity not in ("dot", "cos"):
            raise ConfigError(f"similarity must be 'dot' or 'cos', got {similarity!r}")
        self.temperature = float(temperature)
        self.similarity = similarity
        self.dropout_view = bool(dropout_view)

    def init_args(self) -> dict[str, Any]:
        return {"weight": self.weight, "temperature": self.temperature, "similarity": self.similarity,
                "dropout_view": self.dropout_view}

    @property
    def anchor(self) -> str:
        return "sequence_dropout" if self.dropout_view else "sequence"

    def views(self, batch: PretrainBatch) -> dict[str, Tensor]:
        if "positive_ids" not in batch:
            raise RuntimeError("SameTargetInfoNCE needs same-target positives in the batch: SequenceDataModule "
                               "attaches them to training batches when the module's uses_positives is true; outside "
                               "a Trainer, call datamodule.add_positives(batch, epoch)")
        return {self.anchor: batch["input_ids"], "positive": batch["positive_ids"]}

    def loss(self, encoder: SequenceEncoder, batch: PretrainBatch, reprs: dict[str, Tensor]) -> Tensor:
        keep = batch["has_positive"]
        return info_nce(reprs[self.anchor][keep], reprs["positive"][keep], self.temperature, self.similarity)


def objective_from_record(value: Objective | dict[str, Any]) -> Objective:
    """An objective, or one rebuilt from its :meth:`Objective.record` (a checkpoint's
    hyper-parameters); only classes of this module are accepted."""
    if isinstance(value, Objective):
        return value
    if not isinstance(value, dict) or "class_path" not in value:
        raise ConfigError(f"an objective must be an Objective or a {{class_path, init_args}} record, got {value!r}")
    path = str(value["class_path"])
    module, _, name = path.rpartition(".")
    if module not in TRUSTED_MODULES:
        raise ConfigError(f"objective class {path!r} is not in one of {TRUSTED_MODULES}")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ConfigError(f"{path!r} is not an objective class")
    return cls(**value.get("init_args", {}))
