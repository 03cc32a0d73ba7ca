"""Same-target positive pairs for retrieval training (L_ret).

Two training pairs are positives when their next item is the same. The groups are stored as
CSR arrays over the training split only (validation and test targets never enter), and a
positive is drawn afresh each epoch with a counter-based hash of (seed, epoch, pair): the draw
does not depend on batch composition, worker count, DDP rank or resumption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from raserec.errors import ConfigError

#: What to do for a pair whose target no other training pair shares.
#: "self": the pair is its own positive (the authors' DuoRec fallback);
#: "exclude": it gets ``has_positive = False`` and the loss leaves it out of L_ret.
LonelyPolicy = Literal["self", "exclude"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class SameTargetPositives:
    """Training pairs grouped by target item, in CSR form.

    ``members[indptr[t]:indptr[t + 1]]`` are the training-pair rows whose target is item ``t``;
    ``slot[p]`` is the position of pair ``p`` inside its group.
    """

    indptr: np.ndarray  # int64 [num_items + 2]
    members: np.ndarray  # int64 [P]
    slot: np.ndarray  # int64 [P]
    targets: np.ndarray  # int64 [P]
    policy: LonelyPolicy = "self"

    @classmethod
    def build(cls, targets: np.ndarray, num_items: int, policy: LonelyPolicy = "self") -> SameTargetPositives:
        if policy not in ("self", "exclude"):
            raise ConfigError(f"positive policy must be 'self' or 'exclude', got {policy!r}")
        targets = np.asarray(targets, dtype=np.int64)
        members = np.argsort(targets, kind="stable")
        counts = np.bincount(targets, minlength=num_items + 1)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        slot = np.empty(len(targets), dtype=np.int64)
        slot[members] = np.arange(len(targets)) - indptr[targets[members]]
        return cls(indptr, members, slot, targets, policy)

    def group_size(self, rows: np.ndarray) -> np.ndarray:
        t = self.targets[rows]
        return self.indptr[t + 1] - self.indptr[t]

    def sample(self, rows: np.ndarray, epoch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Draw one positive for each pair in ``rows``.

        Returns ``(positive_rows, has_positive)``. A drawn positive always has the same target
        and is a different pair whenever the group has another member.
        """
        rows = np.asarray(rows, dtype=np.int64)
        size = self.group_size(rows)
        with np.errstate(over="ignore"):  # the key wraps modulo 2^64 on purpose
            key = (np.uint64(seed) * np.uint64(1_000_003) + np.uint64(epoch)) * np.uint64(0x100000001B3)
        r = _splitmix64(rows.astype(np.uint64) ^ key)
        others = np.maximum(size - 1, 1).astype(np.uint64)
        pick = (r % others).astype(np.int64)
        pick += pick >= self.slot[rows]  # skip the pair itself
        has_other = size > 1
        start = self.indptr[self.targets[rows]]
        chosen = self.members[np.minimum(start + pick, len(self.members) - 1)]
        positive = np.where(has_other, chosen, rows)
        has_positive = has_other if self.policy == "exclude" else np.ones_like(has_other)
        return positive, has_positive
