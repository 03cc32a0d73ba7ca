"""What every ``raserec analyze`` command shares: loading a trained RAFT checkpoint with its data,
ranking queries with and without retrieval augmentation, equal-size grouping, and writing the
CSV + PNG + provenance JSON of a figure."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from raserec.data.batch import PairDataset
from raserec.data.datamodule import SequenceDataModule
from raserec.errors import CheckpointError, RaserecError
from raserec.evaluation.per_query import (
    build_bank,
    encoder_scores,
    metrics_from_ranks,
    module_scores,
    query_ranks,
)
from raserec.memory.bank import MemoryBank
from raserec.results import command_line, hardware, write_results

#: Columns reported for every model variant.
METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10")


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
    blob = torch.load(checkpoint, map_location="cpu", weights_only=False)
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
                                             map_location="cpu", weights_only=False, **overrides)
    module.eval()
    return module, dm


@dataclass
class Evaluator:
    """Ranks queries with the RAFT module (``augmented``) or its frozen encoder alone."""

    module: Any
    dm: SequenceDataModule
    progress: bool = True
    _test_bank: MemoryBank | None = field(default=None, repr=False)
    _cache: dict[bool, np.ndarray] = field(default_factory=dict, repr=False)

    def test_bank(self) -> MemoryBank:
        """The test-time memory bank (training + validation pairs), built once."""
        if self._test_bank is None:
            self._test_bank = build_bank(self.module, self.dm, "test", progress=self.progress)
        return self._test_bank

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


def equal_groups(values: np.ndarray, n_groups: int) -> np.ndarray:
    """Group id 0..n_groups-1 of each value: equal-size groups in increasing order of ``values``
    (ties broken by position, so group sizes differ by at most one)."""
    if n_groups < 1:
        raise RaserecError(f"the number of groups must be >= 1, got {n_groups}")
    if len(values) < n_groups:
        raise RaserecError(f"cannot split {len(values)} queries into {n_groups} groups")
    order = np.argsort(values, kind="stable")
    group = np.empty(len(values), dtype=np.int64)
    for g, rows in enumerate(np.array_split(order, n_groups)):
        group[rows] = g
    return group


def compare_groups(group: np.ndarray, values: np.ndarray, value_name: str, base: np.ndarray,
                   tuned: np.ndarray, ks: tuple[int, ...] = (5,)) -> pl.DataFrame:
    """Per group: size, value range and HR/NDCG@k of the encoder and RaSeRec, with the gain in %."""
    rows = []
    for g in range(int(group.max()) + 1):
        sel = group == g
        mb, mt = metrics_from_ranks(base[sel], ks), metrics_from_ranks(tuned[sel], ks)
        row: dict[str, Any] = {"group": g + 1, "queries": int(sel.sum()),
                               f"{value_name}_min": float(values[sel].min()), f"{value_name}_max": float(values[sel].max())}
        for key in mb:
            row[f"encoder_{key}"] = mb[key]
            row[f"raserec_{key}"] = mt[key]
        for key in mb:
            row[f"improvement_{key}_pct"] = _pct(mt[key], mb[key])
        rows.append(row)
    return pl.DataFrame(rows)


def _pct(new: float, old: float) -> float | None:
    return None if old == 0 else 100.0 * (new - old) / old


@dataclass
class Output:
    """Where an analysis writes ``<name>.csv``, ``<name>.png`` and ``<name>.json``."""

    directory: Path
    name: str
    started: float = field(default_factory=time.perf_counter)

    def write(self, table: pl.DataFrame, figure, provenance: dict[str, Any]) -> dict[str, Path]:
        self.directory.mkdir(parents=True, exist_ok=True)
        paths = {ext: self.directory / f"{self.name}.{ext}" for ext in ("csv", "png", "json")}
        table.write_csv(paths["csv"])
        figure.savefig(paths["png"], dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure)
        record = {"command": command_line(), "hardware": hardware(), "analysis": self.name,
                  "wall_time_s": round(time.perf_counter() - self.started, 2), **provenance,
                  "table": json.loads(table.write_json())}
        write_results(paths["json"], record)
        return paths


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib figure (headless backend) with ``ncols`` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def bar_line(table: pl.DataFrame, x: str, bars: dict[str, str], line: str | None, title: str, ylabel: str,
             line_label: str = "improvement (%)", ax=None):
    """Grouped bars (``bars``: column -> legend) and an optional line on a twin axis (on ``ax``,
    or on a new figure); returns the figure."""
    if ax is None:
        fig, (ax,) = figure(width=max(6.0, 0.7 * table.height + 2))
    fig = ax.figure
    xs = np.arange(table.height)
    width = 0.8 / max(1, len(bars))
    for i, (col, label) in enumerate(bars.items()):
        ax.bar(xs + (i - (len(bars) - 1) / 2) * width, table[col].to_numpy(), width, label=label)
    ax.set_xticks(xs, [str(v) for v in table[x].to_list()])
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if line is not None:
        ax2 = ax.twinx()
        values = np.array([np.nan if v is None else v for v in table[line].to_list()], dtype=float)
        ax2.plot(xs, values, "o-", color="black", label=line_label)
        ax2.axhline(0.0, color="grey", lw=0.5)
        ax2.set_ylabel(line_label)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def provenance(module, dm: SequenceDataModule, checkpoint: str | Path, **extra: Any) -> dict[str, Any]:
    return {"checkpoint": str(checkpoint), "data": str(dm.data_path), "dataset": dm.data_path.stem,
            "k": module.k, "alpha": module.ram.alpha, "beta": module.ram.beta, **extra}


__all__ = ["load_raft", "Evaluator", "equal_groups", "compare_groups", "Output", "bar_line", "figure", "METRICS",
           "metrics_from_ranks"]
