"""Noise (RQ7): random items inserted into every test sequence (seeded), with and without
retrieval augmentation. The memory bank and the models are unchanged."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from raserec.analysis.common import METRICS, Evaluator, figure, metrics_from_ranks
from raserec.data.batch import PairDataset
from raserec.data.split import PairSet
from raserec.errors import RaserecError


def noisy_test_queries(dm, ratio: float, seed: int) -> PairDataset:
    """Test queries whose inputs have ``round(ratio * length)`` random items (uniform over all
    items) inserted at random positions; the target is unchanged. Vectorised: every item gets a
    sort key (original items their position + 0.5, inserted items a uniform position) and one
    lexsort interleaves them."""
    if not 0.0 <= ratio:
        raise RaserecError(f"noise ratio must be >= 0, got {ratio}")
    data = dm.data
    test = dm.pairs("test")
    rng = np.random.default_rng(seed)
    lengths = test.end  # input length of each test query (the target follows)
    n_noise = np.rint(ratio * lengths).astype(np.int64)
    users = np.arange(data.num_users)
    # original inputs
    orig_user = np.repeat(users, lengths)
    orig_pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    orig_items = data.items[np.repeat(data.offsets[:-1], lengths) + orig_pos]
    # inserted items
    noise_user = np.repeat(users, n_noise)
    noise_key = rng.uniform(0.0, 1.0, n_noise.sum()) * np.repeat(lengths, n_noise)
    noise_items = rng.integers(1, data.num_items + 1, n_noise.sum())
    # targets last
    user = np.concatenate([orig_user, noise_user, users])
    key = np.concatenate([orig_pos + 0.5, noise_key, lengths + 1.0])
    items = np.concatenate([orig_items, noise_items, test.target]).astype(np.int64)
    order = np.lexsort((key, user))
    new_len = lengths + n_noise + 1
    offsets = np.concatenate([[0], np.cumsum(new_len)]).astype(np.int64)
    pairs = PairSet(test.user, new_len - 1, test.target)
    return PairDataset(pairs, offsets, items[order], dm.max_len)


def noise(ev: Evaluator, ratios: Sequence[float] = (0.1, 0.2, 0.3), seed: int = 2024) -> tuple[pl.DataFrame, object]:
    rows = []
    for ratio in (0.0, *ratios):
        dataset = None if ratio == 0.0 else noisy_test_queries(ev.dm, ratio, seed)  # None: the clean queries
        for model, augmented in (("encoder", False), ("raserec", True)):
            ranks = ev.ranks(dataset, augmented=augmented)
            m = metrics_from_ranks(ranks, (5, 10))
            rows.append({"ratio": ratio, "model": model, **{k: m[k] for k in METRICS}})
    table = pl.DataFrame(rows)
    fig, axes = figure(2)
    for ax, metric in zip(axes, ("HR@5", "NDCG@5"), strict=True):
        for model, label in (("encoder", "w/o aug (encoder)"), ("raserec", "w/ aug (RaSeRec)")):
            sub = table.filter(pl.col("model") == model)
            ax.plot(sub["ratio"].to_numpy() * 100, sub[metric].to_numpy(), "o-", label=label)
        ax.set_xlabel("inserted random items (% of the sequence)")
        ax.set_ylabel(metric)
        ax.set_title(f"Noise robustness: {metric}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return table, fig
