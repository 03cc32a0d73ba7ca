"""Memory-bank partitions (RQ5): the trained RaSeRec queried against subsets of its test-time
memory bank, split by prefix length into S(hort) / M(edium) / L(ong), without retraining."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import polars as pl

from raserec.analysis.common import Evaluator, bar_line, metrics_from_ranks
from raserec.errors import RaserecError
from raserec.evaluation.metrics import relative_change_pct

#: Paper Table 7: S = prefix length < lo, M = lo..hi, L = > hi.
PAPER_BOUNDS: dict[str, tuple[int, int]] = {"beauty": (3, 6), "sports": (3, 6), "sports_and_outdoors": (3, 6),
                                            "clothing": (2, 3), "clothing_shoes_and_jewelry": (2, 3)}


def default_bounds(dataset: str) -> tuple[int, int]:
    return PAPER_BOUNDS.get(dataset.lower(), (3, 6))


def partition_of(lengths: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """0 (S: < lo), 1 (M: lo..hi) or 2 (L: > hi) per memory."""
    if not 1 <= lo <= hi:
        raise RaserecError(f"partition bounds must satisfy 1 <= lo <= hi, got {lo}, {hi}")
    return np.where(lengths < lo, 0, np.where(lengths <= hi, 1, 2))


def partitions(ev: Evaluator, lo: int, hi: int) -> tuple[pl.DataFrame, object]:
    """HR@5 / NDCG@5 with every non-empty combination of S, M and L, and the change against All."""
    full = ev.test_bank()
    part = partition_of(full.ends, lo, hi)  # prefix length of each memory
    names = "SML"
    rows = []
    combos = [tuple(range(3))] + [c for r in (1, 2) for c in combinations(range(3), r)]
    for combo in combos:
        keep = np.isin(part, combo)
        label = "All" if len(combo) == 3 else "+".join(names[i] for i in combo)
        if not keep.any():
            rows.append({"partition": label, "entries": 0, "HR@5": None, "NDCG@5": None})
            continue
        bank = full if keep.all() else full.subset(keep)
        m = metrics_from_ranks(ev.ranks(ev.dm.dataset("test"), augmented=True, bank=bank), (5,))
        rows.append({"partition": label, "entries": int(keep.sum()), "HR@5": m["HR@5"], "NDCG@5": m["NDCG@5"]})
    table = pl.DataFrame(rows)
    base = table.row(0, named=True)
    table = table.with_columns(
        relative_change_pct(pl.col("HR@5"), base["HR@5"]).alias("change_HR@5_pct"),
        relative_change_pct(pl.col("NDCG@5"), base["NDCG@5"]).alias("change_NDCG@5_pct"),
    )
    fig = bar_line(table, "partition", {"HR@5": "HR@5", "NDCG@5": "NDCG@5"}, "change_NDCG@5_pct",
                   f"Memory-bank partitions (S < {lo} <= M <= {hi} < L, by prefix length)", "metric",
                   line_label="NDCG@5 change vs All (%)")
    return table, fig
