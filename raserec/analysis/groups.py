"""Long tail (RQ3) and user activity (RQ6): test queries in equal-size groups, RaSeRec vs its own
pre-trained encoder (= "w/o aug": the same frozen encoder without retrieval augmentation)."""

from __future__ import annotations

import numpy as np
import polars as pl

from raserec.analysis.common import Evaluator, bar_line, compare_groups, equal_groups, figure
from raserec.data.datamodule import SequenceDataModule


def item_popularity(dm: SequenceDataModule) -> np.ndarray:
    """Interactions per item (index = item id) in the training part of every sequence (all but
    the last two items), i.e. what the models saw during training."""
    data = dm.data
    pos = np.arange(data.num_interactions) - np.repeat(data.offsets[:-1], data.lengths)
    train = pos < np.repeat(data.lengths - 2, data.lengths)
    return np.bincount(data.items[train], minlength=data.num_items + 1)


def long_tail(ev: Evaluator, n_groups: int = 10) -> tuple[pl.DataFrame, object]:
    """NDCG@5 / HR@5 per group of test queries ordered by the popularity of their target."""
    pairs = ev.dm.pairs("test")
    popularity = item_popularity(ev.dm)[pairs.target]
    group = equal_groups(popularity, n_groups)
    table = compare_groups(group, popularity, "popularity", ev.ranks(augmented=False), ev.ranks(augmented=True))
    fig = bar_line(table, "group", {"encoder_NDCG@5": "w/o aug (encoder)", "raserec_NDCG@5": "RaSeRec"},
                   "improvement_NDCG@5_pct", "Long tail: NDCG@5 by target popularity (group 1 = least popular)",
                   "NDCG@5")
    return table, fig


def user_activity(ev: Evaluator, n_groups: int = 8) -> tuple[pl.DataFrame, object]:
    """HR@5 / NDCG@5 per group of test queries ordered by the length of the user's sequence."""
    pairs = ev.dm.pairs("test")
    length = pairs.end.astype(np.float64)  # the test input: the whole history but the target
    group = equal_groups(length, n_groups)
    table = compare_groups(group, length, "length", ev.ranks(augmented=False), ev.ranks(augmented=True))
    fig, (left, right) = figure(2)
    bar_line(table, "group", {"encoder_HR@5": "w/o aug", "raserec_HR@5": "w/ aug"}, "improvement_HR@5_pct",
             "User activity: HR@5 by sequence length (group 8 = longest)", "HR@5", ax=left)
    bar_line(table, "group", {"encoder_NDCG@5": "w/o aug", "raserec_NDCG@5": "w/ aug"},
             "improvement_NDCG@5_pct", "User activity: NDCG@5 by sequence length", "NDCG@5", ax=right)
    return table, fig
