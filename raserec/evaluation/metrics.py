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
