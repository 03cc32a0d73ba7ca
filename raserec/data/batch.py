"""Batch contracts and vectorised collation.

Sequences are left-padded: the most recent item sits at the last column, so every encoder reads
its output at position -1 and positions are aligned by recency.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch
from torch import Tensor

from raserec.data.split import PairSet


class SequenceBatch(TypedDict):
    """What every dataloader yields."""

    index: Tensor  # int64 [B]: row of the query in its PairSet (a unique query id)
    user: Tensor  # int64 [B]: dense user id
    end: Tensor  # int64 [B]: prefix length (position of the target in the user's sequence)
    input_ids: Tensor  # int64 [B, T]: left-padded item ids, 0 = padding
    target: Tensor  # int64 [B]: next item (0 when unknown, at predict time)


class PretrainBatch(SequenceBatch, total=False):
    """Training batch with a same-target positive (added per epoch by the datamodule)."""

    positive_ids: Tensor  # int64 [B, T]
    has_positive: Tensor  # bool [B]


def gather_prefixes(items: Tensor, start: Tensor, stop: Tensor, max_len: int) -> Tensor:
    """Left-padded windows ``items[max(start, stop - max_len):stop]`` as a [B, max_len] tensor.

    ``start``/``stop`` are absolute positions in the flat item array; one gather, no Python loop.
    """
    idx = stop.unsqueeze(1) - max_len + torch.arange(max_len, dtype=stop.dtype, device=stop.device)
    valid = idx >= start.unsqueeze(1)
    out = items[idx.clamp_min(0)]
    return out.masked_fill_(~valid, 0)


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset over a :class:`PairSet`; ``__getitems__`` builds a whole batch at once
    (the DataLoader calls it with the sampler's list of indices), so collation is vectorised."""

    def __init__(self, pairs: PairSet, offsets: np.ndarray, items: np.ndarray, max_len: int):
        self.pairs = pairs
        self.max_len = max_len
        self._items = torch.from_numpy(items.astype(np.int64))
        self._offsets = torch.from_numpy(offsets.astype(np.int64))
        self._user = torch.from_numpy(pairs.user)
        self._end = torch.from_numpy(pairs.end)
        self._target = torch.from_numpy(pairs.target)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> SequenceBatch:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}  # type: ignore[return-value]

    def prefixes(self, rows: Tensor, max_len: int | None = None) -> Tensor:
        """Left-padded prefixes of the given pair rows."""
        start = self._offsets[self._user[rows]]
        return gather_prefixes(self._items, start, start + self._end[rows], max_len or self.max_len)

    def __getitems__(self, indices: list[int]) -> SequenceBatch:
        rows = torch.as_tensor(indices, dtype=torch.int64)
        return SequenceBatch(
            index=rows,
            user=self._user[rows],
            end=self._end[rows],
            input_ids=self.prefixes(rows),
            target=self._target[rows],
        )


def passthrough(batch: SequenceBatch) -> SequenceBatch:
    """collate_fn for datasets whose ``__getitems__`` already returns a batch."""
    return batch
