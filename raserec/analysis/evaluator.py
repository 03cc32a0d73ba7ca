"""A trained RAFT model outside a Trainer: load it with its data, and rank the test queries with
and without its memories (what the analyses and the experiment runner's paired tests need)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raserec.checkpoint import RECORD_KEY, load_checkpoint_dict
from raserec.data.batch import PairDataset
from raserec.data.datamodule import SequenceDataModule
from raserec.errors import CheckpointError, RaserecError
from raserec.evaluation.per_query import encoder_scores, module_scores, query_ranks
from raserec.finetune.module import RAFTModule
from raserec.memory.bank import MemoryBank
from raserec.memory.retriever import BankStage


def load_raft(checkpoint: str | Path, data_path: str | Path | None = None, cache_dir: str | None = ".cache/datasets",
              **overrides: Any):
    """A trained :class:`RAFTModule` (in eval mode, on CPU) and the datamodule of its data.

    The RAFT checkpoint embeds its frozen encoder, so the pre-training checkpoint is not needed;
    ``data_path`` defaults to the data the checkpoint was trained on; ``overrides`` replace
    hyper-parameters (e.g. ``bank={"k": 30}``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file")
    blob = load_checkpoint_dict(checkpoint)
    if RECORD_KEY in blob and "state_dict" not in blob:
        raise CheckpointError(f"{checkpoint}: an encoder record, not a RAFT checkpoint; pass the stage-2 checkpoint")
    class_path = str(blob.get("module_class") or blob.get("hyper_parameters", {}).get("_class_path", ""))
    if class_path.rsplit(".", 1)[-1] not in (*RAFT_CLASSES, ""):
        raise CheckpointError(f"{checkpoint}: not a RAFT checkpoint (class {class_path})")
    if not any(k.startswith("ram.") for k in blob.get("state_dict", {})):
        raise CheckpointError(f"{checkpoint}: not a RAFT checkpoint (no RAM weights); pass the stage-2 checkpoint")
    dm_hp = dict(blob.get("datamodule_hyper_parameters") or {})
    dm_hp.pop("_instantiator", None)
    if data_path is not None:
        dm_hp["data_path"] = str(data_path)
    if "data_path" not in dm_hp:
        raise RaserecError(f"{checkpoint} does not record its data; pass --data")
    dm_hp["cache_dir"] = cache_dir
    dm = SequenceDataModule(**dm_hp)
    dm.setup("test")
    cls = raft_class(class_path)
    try:
        module = cls.load_from_checkpoint(checkpoint, encoder_checkpoint=str(checkpoint), num_items=dm.num_items,
                                          map_location="cpu", weights_only=True, **overrides)
    except (TypeError, KeyError) as exc:  # hyper-parameters the class does not take: a foreign file
        raise CheckpointError(f"{checkpoint}: does not build a {cls.__name__} ({type(exc).__name__}: {exc})") from exc
    if hasattr(module, "attach"):  # e.g. semantic keys: tables built from the data, never stored
        module.attach(dm)
    module.eval()
    return module, dm


#: RAFT modules a checkpoint may name (by class name; checkpoints never import arbitrary code).
RAFT_CLASSES = ("RAFTModule", "SemanticKeysRAFTModule")


def raft_class(class_path: str) -> type[RAFTModule]:
    """The RAFT module class a checkpoint's ``_class_path`` names (plain RAFT when absent)."""
    if class_path.rsplit(".", 1)[-1] == "SemanticKeysRAFTModule":
        from raserec.semantic.keys import SemanticKeysRAFTModule

        return SemanticKeysRAFTModule
    return RAFTModule


@dataclass
class Evaluator:
    """Ranks queries with the RAFT module (``augmented``) or its frozen encoder alone.

    ``test_memory`` may pass a test-time bank already built by the same frozen encoder."""

    module: RAFTModule
    dm: SequenceDataModule
    progress: bool = True
    test_memory: MemoryBank | None = None
    _fit_bank: MemoryBank | None = field(default=None, repr=False)
    _cache: dict[bool, np.ndarray] = field(default_factory=dict, repr=False)

    def bank(self, stage: BankStage, dm: SequenceDataModule | None = None) -> MemoryBank:
        """A new bank of ``stage``'s reference set of ``dm`` (default: this evaluator's data),
        keyed by the module's frozen encoder with its bank settings; the module's current bank
        is left as it was."""
        retriever = self.module.retriever
        dm = self.dm if dm is None else dm
        current = retriever.bank
        try:
            return retriever.build(dm.reference_dataset(stage), dm.reference_version(stage), progress=self.progress)
        finally:
            retriever.bank = current

    def test_bank(self) -> MemoryBank:
        """The test-time memory bank (training + validation pairs), built once."""
        if self.test_memory is None:
            self.test_memory = self.bank("test")
        return self.test_memory

    def fit_bank(self) -> MemoryBank:
        """The training-time memory bank (training pairs), built once."""
        if self._fit_bank is None:
            self._fit_bank = self.bank("fit")
        return self._fit_bank

    def ranks(self, dataset: PairDataset | None = None, augmented: bool = True,
              bank: MemoryBank | None = None) -> np.ndarray:
        """Target ranks of ``dataset`` (default: the test queries; those ranks are cached)."""
        if dataset is None and bank is None:
            if augmented not in self._cache:
                self._cache[augmented] = self.ranks(self.dm.dataset("test"), augmented, self.test_bank())
            return self._cache[augmented]
        dataset = self.dm.dataset("test") if dataset is None else dataset
        kw = {"batch_size": self.dm.eval_batch_size, "mask_history": self.module.mask_history,
              "progress": self.progress}
        if not augmented:
            return query_ranks(encoder_scores(self.module.encoder), dataset, desc="ranking: encoder", **kw)
        self.module.retriever.bank = self.test_bank() if bank is None else bank
        return query_ranks(module_scores(self.module), dataset, desc="ranking: RaSeRec", **kw)
