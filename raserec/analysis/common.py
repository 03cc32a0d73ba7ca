"""What every ``raserec analyze`` command shares: equal-size grouping, per-group comparisons and
writing the CSV + PNG + provenance JSON of a figure. Loading a RAFT checkpoint and ranking
queries with and without augmentation live in :mod:`raserec.analysis.evaluator`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from raserec.analysis.evaluator import Evaluator, load_raft
from raserec.data.datamodule import SequenceDataModule
from raserec.errors import RaserecError
from raserec.evaluation.metrics import relative_change_pct
from raserec.evaluation.per_query import metrics_from_ranks
from raserec.results import hardware, write_results

#: Columns reported for every model variant.
METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10")


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
            row[f"improvement_{key}_pct"] = relative_change_pct(mt[key], mb[key])
        rows.append(row)
    return pl.DataFrame(rows)



@dataclass
class Output:
    """Where an analysis writes ``<name>.csv``, ``<name>.png`` and ``<name>.json`` (with
    ``command``, the command line that produced it)."""

    directory: Path
    name: str
    command: str
    started: float = field(default_factory=time.perf_counter)

    def write(self, table: pl.DataFrame, figure, provenance: dict[str, Any]) -> dict[str, Path]:
        self.directory.mkdir(parents=True, exist_ok=True)
        paths = {ext: self.directory / f"{self.name}.{ext}" for ext in ("csv", "png", "json")}
        table.write_csv(paths["csv"])
        figure.savefig(paths["png"], dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure)
        record = {"command": self.command, "hardware": hardware(), "analysis": self.name,
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
            "k": module.retriever.k, "alpha": module.ram.alpha, "beta": module.ram.beta, **extra}


__all__ = ["load_raft", "Evaluator", "equal_groups", "compare_groups", "Output", "bar_line", "figure", "METRICS",
           "metrics_from_ranks"]
