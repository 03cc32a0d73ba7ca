"""HR@K and NDCG@K as a torchmetrics Metric whose state is an integer rank histogram.

Integer states make the result independent of batch size, of the order in which batches arrive,
and of how ranks are split across processes: distributed evaluation is exact, not approximate.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import torch
from torch import Tensor
from torchmetrics import Metric

from raserec.errors import ConfigError


def rank_gains(ranks: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """HR@K (0/1) and NDCG@K of each 0-based target rank: the one formula of both the Lightning
    metrics (:class:`RankingMetrics`, applied to its rank histogram) and the per-query metrics
    (:func:`raserec.evaluation.per_query.per_query_metrics`). One relevant item, so
    NDCG@K = 1 / log2(rank + 2) when rank < K, else 0."""
    ranks = ranks.to(torch.float64)
    gain = 1.0 / torch.log2(ranks + 2.0)
    out: dict[str, Tensor] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = hit.to(torch.float64)
        out[f"NDCG@{k}"] = torch.where(hit, gain, torch.zeros_like(gain))
    return out


def relative_change_pct(new, old):
    """``100 (new - old) / old``; ``None`` when ``old`` is a zero number (works on floats and on
    polars expressions, where ``old`` is the baseline's value)."""
    if isinstance(old, (int, float)) and old == 0:
        # an expression gets a null column (None is not an expression and breaks the select)
        return pl.lit(None, dtype=pl.Float64) if isinstance(new, pl.Expr) else None
    return 100.0 * (new - old) / old


class RankingMetrics(Metric):
    """Hit ratio and NDCG at several cut-offs (and MRR truncated at the largest cut-off)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (5, 10, 20, 50), **kwargs) -> None:
        super().__init__(**kwargs)
        if not ks or min(ks) < 1:
            raise ConfigError(f"cut-offs must be positive, got {ks}")
        self.ks = sorted(set(int(k) for k in ks))
        self.add_state("hist", default=torch.zeros(self.ks[-1], dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ranks: Tensor) -> None:
        """``ranks``: 0-based rank of each query's target."""
        ranks = ranks.detach().long().flatten()
        top = ranks[ranks < self.ks[-1]]
        self.hist += torch.bincount(top, minlength=self.ks[-1]).to(self.hist.device)
        self.total += ranks.numel()

    def compute(self) -> dict[str, Tensor]:
        n = self.total.clamp_min(1).double()
        hist = self.hist.double()
        positions = torch.arange(self.ks[-1], dtype=torch.float64, device=hist.device)
        # Each histogram bin is the number of queries whose target sits at that rank.
        out = {key: (hist * per_rank).sum() / n for key, per_rank in rank_gains(positions, self.ks).items()}
        out[f"MRR@{self.ks[-1]}"] = (hist / (positions + 1.0)).sum() / n
        return {k: v.float() for k, v in out.items()}


class QueryRanks(Metric):
    """The target rank of every query, keyed by the query's row (``batch["index"]``), for paired
    significance tests between two models on the same queries. ``cat`` states: under DDP every
    process contributes its share, and :meth:`compute` returns them in query order."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("rank", default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, ranks: Tensor) -> None:
        """``index``: the queries' rows; ``ranks``: their targets' 0-based ranks."""
        self.index.append(index.detach().long().flatten())
        self.rank.append(ranks.detach().long().flatten().to(self.index[-1].device))

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(rows, ranks)`` sorted by row; a row seen twice (a sampler that pads the last
        batch of a process, as DDP's does) is kept once."""
        index, rank = _flat(self.index), _flat(self.rank)
        if index.numel() == 0:
            return index, rank
        rows, first = _first_occurrence(index)
        return rows, rank[first]


def _flat(state: Tensor | list[Tensor]) -> Tensor:
    """A ``cat`` state as one tensor (a list before syncing; after, a tensor or a list)."""
    if isinstance(state, Tensor):
        return state
    return torch.cat(state) if state else torch.empty(0, dtype=torch.long)


def _first_occurrence(index: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values of ``index`` and the position of each one's first occurrence."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    return sorted_index[keep], order[keep]
