"""The in-memory dataset: every user's chronological item sequence in CSR form.

All later stages (splits, positives, the memory bank) read this one structure. Items are densely
remapped to ``1..num_items`` (0 is padding) and users to ``0..num_users-1``; the original ids are
kept so predictions can be reported with them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

from raserec.errors import DataError

log = logging.getLogger(__name__)

#: Columns of the normalised interaction table every reader returns.
INTERACTION_SCHEMA = {"user": pl.Utf8, "item": pl.Utf8, "order": pl.Int64}


@dataclass(frozen=True)
class SequenceData:
    """Per-user item sequences, flattened.

    ``items[offsets[u]:offsets[u + 1]]`` is user ``u``'s history in chronological order.
    """

    offsets: np.ndarray  # int64 [num_users + 1]
    items: np.ndarray  # int32 [num_interactions], values in 1..num_items
    user_ids: np.ndarray  # object/str [num_users]: original user id of dense user u
    item_ids: np.ndarray  # object/str [num_items + 1]: original item id of dense item i; [0] = ""

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        """Number of real items (the embedding table has ``num_items + 1`` rows)."""
        return len(self.item_ids) - 1

    @property
    def num_interactions(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def content_hash(self) -> str:
        """sha256 over the arrays and id maps: identifies the dataset independent of its file."""
        h = hashlib.sha256()
        for arr in (self.offsets.astype(np.int64), self.items.astype(np.int32)):
            h.update(np.ascontiguousarray(arr).tobytes())
        for ids in (self.user_ids, self.item_ids):
            h.update("\x1f".join(map(str, ids)).encode())
        return h.hexdigest()

    def append(self, interactions: pl.DataFrame) -> SequenceData:
        """Return a new dataset with ``interactions`` (user, item, order; original ids) appended
        after each user's existing history. Unknown users or items are an error: the item table
        of a trained model cannot grow."""
        _check_schema(interactions, "appended interactions")
        user_index = {u: i for i, u in enumerate(self.user_ids.tolist())}
        item_index = {it: i for i, it in enumerate(self.item_ids.tolist()) if i > 0}
        new = interactions.sort(["user", "order"], maintain_order=True)
        users = new["user"].to_list()
        items = new["item"].to_list()
        unknown_u = sorted({u for u in users if u not in user_index})
        unknown_i = sorted({it for it in items if it not in item_index})
        if unknown_u or unknown_i:
            raise DataError(
                f"cannot append: {len(unknown_u)} unknown users (e.g. {unknown_u[:3]}) and "
                f"{len(unknown_i)} unknown items (e.g. {unknown_i[:3]})"
            )
        u_dense = np.fromiter((user_index[u] for u in users), dtype=np.int64, count=len(users))
        i_dense = np.fromiter((item_index[it] for it in items), dtype=np.int32, count=len(items))
        old_user_of = np.repeat(np.arange(self.num_users), self.lengths)
        all_users = np.concatenate([old_user_of, u_dense])
        all_items = np.concatenate([self.items, i_dense])
        order = np.argsort(all_users, kind="stable")  # stable: old history first, then new rows
        counts = np.bincount(all_users, minlength=self.num_users)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return SequenceData(offsets, all_items[order].astype(np.int32), self.user_ids, self.item_ids)


def _check_schema(df: pl.DataFrame, what: str) -> None:
    missing = [c for c in INTERACTION_SCHEMA if c not in df.columns]
    if missing:
        raise DataError(f"{what}: missing columns {missing} (need user, item, order)")


def _sorted_ids(values: pl.Series) -> pl.Series:
    """Unique ids in a reproducible order: numeric order when every id is an integer (so the
    shared line files keep their ids), lexicographic otherwise."""
    uniq = values.unique()
    as_int = uniq.cast(pl.Int64, strict=False)
    if as_int.null_count() == 0:
        return pl.DataFrame({"id": uniq, "k": as_int}).sort("k")["id"]
    return uniq.sort()


def sequences_from_interactions(df: pl.DataFrame, min_length: int = 3, source: str = "") -> SequenceData:
    """Build :class:`SequenceData` from a normalised interaction table.

    Rows are ordered by (user, order) with the file order as a stable tie-break. Users with fewer
    than ``min_length`` interactions cannot be split leave-one-out; they are dropped, counted and
    logged (never silently), and items seen only by them disappear with them.
    """
    _check_schema(df, source or "interactions")
    if df.height == 0:
        raise DataError(f"{source or 'interactions'}: no interactions")
    df = df.select(pl.col("user").cast(pl.Utf8), pl.col("item").cast(pl.Utf8), pl.col("order").cast(pl.Int64))
    df = df.with_row_index("_row").sort(["user", "order", "_row"])
    counts = df.group_by("user").len()
    short = counts.filter(pl.col("len") < min_length)
    if short.height:
        log.warning(
            "%s: dropped %d users with fewer than %d interactions (%d interactions)",
            source or "interactions", short.height, min_length, int(short["len"].sum()),
        )
        df = df.join(short.select("user"), on="user", how="anti")
    if df.height == 0:
        raise DataError(
            f"{source or 'interactions'}: every user has fewer than {min_length} interactions; "
            "nothing can be split leave-one-out"
        )
    user_ids = _sorted_ids(df["user"])
    item_ids = _sorted_ids(df["item"])
    umap = pl.DataFrame({"user": user_ids, "u": np.arange(len(user_ids), dtype=np.int64)})
    imap = pl.DataFrame({"item": item_ids, "i": np.arange(1, len(item_ids) + 1, dtype=np.int32)})
    dense = df.join(umap, on="user").join(imap, on="item").sort(["u", "order", "_row"])
    u = dense["u"].to_numpy()
    counts_arr = np.bincount(u, minlength=len(user_ids))
    offsets = np.concatenate([[0], np.cumsum(counts_arr)]).astype(np.int64)
    return SequenceData(
        offsets=offsets,
        items=dense["i"].to_numpy().astype(np.int32),
        user_ids=np.asarray(user_ids.to_list(), dtype=object),
        item_ids=np.asarray([""] + item_ids.to_list(), dtype=object),
    )


def dataset_stats(data: SequenceData) -> dict[str, float]:
    """Statistics as in the paper's Table 5. Sparsity counts distinct (user, item) pairs, so a
    user who repeats items cannot push it below 0."""
    users, items, inters = data.num_users, data.num_items, data.num_interactions
    user_of = np.repeat(np.arange(users, dtype=np.int64), np.diff(data.offsets))
    distinct = len(np.unique(user_of * (items + 1) + data.items.astype(np.int64)))
    return {
        "users": users,
        "items": items,
        "interactions": inters,
        "avg_length": inters / users,
        "sparsity": 1.0 - distinct / (users * items),
    }
