"""Leave-one-out splits and autoregressive <prefix, target> pairs.

For a user with items v1..vn: the test query is v1..v(n-1) -> vn, the validation query
v1..v(n-2) -> v(n-1), and the training pairs are every prefix v1..vt -> v(t+1) for t = 1..n-3.
A pair is stored as (user, end): the prefix is the user's first ``end`` items (truncated to the
last ``max_len`` when batched) and the target is the item at position ``end``. Keeping ``end``
lets the memory bank exclude a user's own future.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raserec.data.sequences import SequenceData


@dataclass(frozen=True)
class PairSet:
    """A set of <prefix, target> pairs, one row each. ``target`` is 0 when unknown (predict)."""

    user: np.ndarray  # int64 [P]
    end: np.ndarray  # int64 [P]: prefix length == position of the target in the user's sequence
    target: np.ndarray  # int64 [P]

    def __len__(self) -> int:
        return len(self.user)

    @staticmethod
    def concat(*sets: PairSet) -> PairSet:
        return PairSet(*(np.concatenate([getattr(s, f) for s in sets]) for f in ("user", "end", "target")))

    def subset(self, rows: np.ndarray) -> PairSet:
        return PairSet(self.user[rows], self.end[rows], self.target[rows])


def _targets(data: SequenceData, user: np.ndarray, end: np.ndarray) -> np.ndarray:
    return data.items[data.offsets[user] + end].astype(np.int64)


def training_pairs(data: SequenceData) -> PairSet:
    """Every training prefix v1..vt -> v(t+1), t = 1..n-3, ordered by user then t."""
    per_user = np.maximum(data.lengths - 3, 0)
    user = np.repeat(np.arange(data.num_users, dtype=np.int64), per_user)
    first_row = np.repeat(np.cumsum(per_user) - per_user, per_user)
    end = np.arange(len(user), dtype=np.int64) - first_row + 1
    return PairSet(user, end, _targets(data, user, end))


def _last_queries(data: SequenceData, back: int) -> PairSet:
    user = np.arange(data.num_users, dtype=np.int64)
    end = data.lengths.astype(np.int64) - back
    return PairSet(user, end, _targets(data, user, end))


def validation_queries(data: SequenceData) -> PairSet:
    """One query per user: v1..v(n-2) -> v(n-1)."""
    return _last_queries(data, 2)


def test_queries(data: SequenceData) -> PairSet:
    """One query per user: v1..v(n-1) -> vn (the input includes the validation item)."""
    return _last_queries(data, 1)


def predict_queries(data: SequenceData) -> PairSet:
    """One query per user over the whole history; the target (the future) is unknown: 0."""
    user = np.arange(data.num_users, dtype=np.int64)
    end = data.lengths.astype(np.int64)
    return PairSet(user, end, np.zeros_like(end))


test_queries.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name
