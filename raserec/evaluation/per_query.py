"""Per-query evaluation outside a Trainer: the target rank of every query, for analyses and
significance tests that need more than the aggregated metrics (groups, paired tests, variants
of the memory bank or of the input sequences).

The same :func:`~raserec.evaluation.ranking.target_ranks` as the Lightning test loop is used, so
the mean of :func:`metrics_from_ranks` equals what ``raserec test`` logs for the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from raserec.checkpoint import load_weights_only
from raserec.data.batch import PairDataset, SequenceBatch
from raserec.data.datamodule import SequenceDataModule, Stage
from raserec.data.split import PairSet
from raserec.errors import CheckpointError, RaserecError
from raserec.evaluation.ranking import target_ranks
from raserec.memory.bank import MemoryBank
from raserec.models.encoders.base import SequenceEncoder

ScoreFn = Callable[[SequenceBatch], Tensor]


@torch.no_grad()
def query_ranks(score_fn: ScoreFn, dataset: PairDataset, *, batch_size: int = 1024, mask_history: bool = False,
                device: torch.device | str = "cpu", progress: bool = False, desc: str = "ranking") -> np.ndarray:
    """0-based rank of the target of every row of ``dataset`` (int64 ``[P]``, dataset order).

    ``score_fn`` maps a batch (already on ``device``) to ``[B, N]`` scores over items 1..N."""
    out = np.empty(len(dataset), dtype=np.int64)
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch", disable=not progress,
                      leave=False):
        rows = list(range(start, min(start + batch_size, len(dataset))))
        batch = {k: v.to(device) for k, v in dataset.__getitems__(rows).items()}
        history = batch["input_ids"] if mask_history else None
        out[start:start + len(rows)] = target_ranks(score_fn(batch), batch["target"], history).cpu().numpy()
    return out


def encoder_scores(encoder: SequenceEncoder) -> ScoreFn:
    """Scores of a plain (pre-trained) encoder: ``h @ item_weights.T`` in eval mode."""
    encoder.eval()
    return lambda batch: encoder(batch["input_ids"]) @ encoder.item_weights().T


def module_scores(module: torch.nn.Module) -> ScoreFn:
    """Scores of a :class:`~raserec.evaluation.module.RecommenderModule` in eval mode (a RAFT
    module needs its ``memory_bank`` set first, e.g. by :func:`build_bank`)."""
    module.eval()
    return module.scores  # type: ignore[return-value]


def build_bank(module, dm: SequenceDataModule, stage: Stage = "test", pairs: PairSet | None = None,
               progress: bool = False) -> MemoryBank:
    """The memory bank a RAFT ``module`` uses at ``stage`` (or over ``pairs``), with the module's
    index settings, attached to the module and returned."""
    version = dm.reference_version(stage) if pairs is None else None
    pairs = dm.reference_pairs(stage) if pairs is None else pairs
    data = dm.data
    bank = MemoryBank.build(module.encoder, PairDataset(pairs, data.offsets, data.items, dm.max_len),
                            module.bank_config, progress=progress, reference_version=version)
    module.memory_bank = bank
    return bank


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (5, 10, 20, 50)) -> dict[str, float]:
    """Mean HR@K and NDCG@K of 0-based ranks (same definitions as :class:`RankingMetrics`)."""
    per = per_query_metrics(ranks, ks)
    return {k: float(v.mean()) if len(v) else float("nan") for k, v in per.items()}


def per_query_metrics(ranks: np.ndarray, ks: Sequence[int] = (5, 10, 20, 50)) -> dict[str, np.ndarray]:
    """HR@K (0/1) and NDCG@K of each query."""
    ranks = np.asarray(ranks, dtype=np.int64)
    gain = 1.0 / np.log2(ranks + 2.0)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = hit.astype(np.float64)
        out[f"NDCG@{k}"] = np.where(hit, gain, 0.0)
    return out


def load_raft(checkpoint: str | Path, data_path: str | Path | None = None, cache_dir: str | None = ".cache/datasets",
              **overrides: Any):
    """A trained :class:`RAFTModule` (in eval mode, on CPU) and the datamodule of its data.

    The RAFT checkpoint embeds its frozen encoder, so the pre-training checkpoint is not needed;
    ``data_path`` defaults to the data the checkpoint was trained on; ``overrides`` replace
    hyper-parameters (e.g. ``k=30``)."""
    from raserec.finetune.module import RAFTModule

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file")
    blob = load_weights_only(checkpoint)
    if blob.get("hyper_parameters", {}).get("_class_path", "").rsplit(".", 1)[-1] not in ("RAFTModule", ""):
        raise CheckpointError(f"{checkpoint}: not a RAFT checkpoint (class {blob['hyper_parameters']['_class_path']})")
    if not any(k.startswith("ram.") for k in blob["state_dict"]):
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
    module = RAFTModule.load_from_checkpoint(checkpoint, encoder_checkpoint=str(checkpoint), num_items=dm.num_items,
                                             map_location="cpu", weights_only=True, **overrides)
    module.eval()
    return module, dm


@dataclass
class Evaluator:
    """Ranks queries with the RAFT module (``augmented``) or its frozen encoder alone.

    ``test_memory`` may pass a test-time bank already built by the same frozen encoder."""

    module: Any
    dm: SequenceDataModule
    progress: bool = True
    test_memory: MemoryBank | None = None
    _fit_bank: MemoryBank | None = field(default=None, repr=False)
    _cache: dict[bool, np.ndarray] = field(default_factory=dict, repr=False)

    def test_bank(self) -> MemoryBank:
        """The test-time memory bank (training + validation pairs), built once."""
        if self.test_memory is None:
            self.test_memory = build_bank(self.module, self.dm, "test", progress=self.progress)
        return self.test_memory

    def fit_bank(self) -> MemoryBank:
        """The training-time memory bank (training pairs), built once."""
        if self._fit_bank is None:
            self._fit_bank = build_bank(self.module, self.dm, "fit", progress=self.progress)
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
        self.module.memory_bank = self.test_bank() if bank is None else bank
        return query_ranks(module_scores(self.module), dataset, desc="ranking: RaSeRec", **kw)
