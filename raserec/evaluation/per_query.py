"""Per-query evaluation outside a Trainer: the target rank of every query, for analyses and
significance tests that need more than the aggregated metrics (groups, paired tests, variants
of the memory bank or of the input sequences).

The same :func:`~raserec.evaluation.ranking.product_ranks` as the Lightning test loop is used, so
the mean of :func:`metrics_from_ranks` equals what ``raserec test`` logs for the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from raserec.data.batch import PairDataset, SequenceBatch
from raserec.evaluation.metrics import rank_gains
from raserec.evaluation.ranking import product_ranks
from raserec.models.encoders.base import SequenceEncoder

#: Maps a batch to (user representations ``[B, d]``, item weights ``[N, d]``, rows = items 1..N).
ScoreFn = Callable[[SequenceBatch], tuple[Tensor, Tensor]]


@torch.no_grad()
def query_ranks(score_fn: ScoreFn, dataset: PairDataset, *, batch_size: int = 1024, mask_history: bool = False,
                device: torch.device | str = "cpu", progress: bool = False, desc: str = "ranking") -> np.ndarray:
    """0-based rank of the target of every row of ``dataset`` (int64 ``[P]``, dataset order).

    ``score_fn`` maps a batch (already on ``device``) to the user representations and the item
    weights whose products score it."""
    out = np.empty(len(dataset), dtype=np.int64)
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch", disable=not progress,
                      leave=False):
        rows = list(range(start, min(start + batch_size, len(dataset))))
        batch = {k: v.to(device) for k, v in dataset.__getitems__(rows).items()}
        history = batch["input_ids"] if mask_history else None
        users, items = score_fn(batch)
        out[start:start + len(rows)] = product_ranks(users, items, batch["target"], history).cpu().numpy()
    return out


def encoder_scores(encoder: SequenceEncoder) -> ScoreFn:
    """A plain (pre-trained) encoder in eval mode: ``h`` and its item weights."""
    encoder.eval()
    return lambda batch: (encoder(batch["input_ids"]), encoder.item_weights())


def module_scores(module: torch.nn.Module) -> ScoreFn:
    """Scores of a :class:`~raserec.evaluation.module.RecommenderModule` in eval mode (a RAFT
    module needs its retriever's bank first, e.g. ``module.retriever.ensure(dm, "test")``)."""
    module.eval()
    return lambda batch: (module.user_representation(batch), module.item_weights())


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (5, 10, 20, 50)) -> dict[str, float]:
    """Mean HR@K and NDCG@K of 0-based ranks (same definitions as :class:`RankingMetrics`)."""
    per = per_query_metrics(ranks, ks)
    return {k: float(v.mean()) if len(v) else float("nan") for k, v in per.items()}


def per_query_metrics(ranks: np.ndarray, ks: Sequence[int] = (5, 10, 20, 50)) -> dict[str, np.ndarray]:
    """HR@K (0/1) and NDCG@K of each query."""
    per = rank_gains(torch.from_numpy(np.asarray(ranks, dtype=np.int64)), ks)
    return {key: value.numpy() for key, value in per.items()}
