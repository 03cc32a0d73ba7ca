"""Full ranking: the rank of the target among all items, with one matmul per batch and no sort."""

from __future__ import annotations

import torch
from torch import Tensor


def target_ranks(scores: Tensor, target: Tensor, history: Tensor | None = None) -> Tensor:
    """0-based rank of each target among all items (``scores`` is ``[B, N]``, column ``j`` = item
    ``j + 1``; ``target`` holds item ids 1..N).

    Ties are resolved pessimistically: every other item scoring at least as high as the target
    ranks before it, so a constant model earns nothing. ``history`` (item ids ``[B, L]``, 0 =
    padding) optionally masks already-seen items; the target itself is never masked.
    """
    cols = target - 1
    if history is not None:
        scores = scores.clone()
        rows = torch.arange(scores.size(0), device=scores.device).unsqueeze(1).expand_as(history)
        keep = (history > 0) & (history != target.unsqueeze(1))
        scores[rows[keep], history[keep] - 1] = float("-inf")
    target_score = scores.gather(1, cols.unsqueeze(1))
    return (scores >= target_score).sum(1) - 1


def top_items(scores: Tensor, k: int, history: Tensor | None = None) -> Tensor:
    """Item ids (1..N) of the ``k`` best-scored items per row, best first."""
    if history is not None:
        scores = scores.clone()
        rows = torch.arange(scores.size(0), device=scores.device).unsqueeze(1).expand_as(history)
        keep = history > 0
        scores[rows[keep], history[keep] - 1] = float("-inf")
    return scores.topk(min(k, scores.size(1)), dim=1).indices + 1
