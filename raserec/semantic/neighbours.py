"""Semantic neighbours: the k most cosine-similar rows of each row, itself (and optionally its
own group, e.g. the same user's other prefixes) excluded."""

from __future__ import annotations

import numpy as np

from raserec.memory.bank import first_k, normalized
from raserec.memory.faiss_import import faiss, one_thread

#: Above this many rows the search is approximate (IVF, ``nprobe`` lists of ``4 sqrt(n)``);
#: below it, exact.
EXACT_UP_TO = 50_000


def _index(keys: np.ndarray, nprobe: int):
    n, d = keys.shape
    if n <= EXACT_UP_TO:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(min(4096, 4 * np.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(keys[rng.choice(n, size=min(n, 64 * nlist), replace=False)])
        index.nprobe = nprobe
    index.add(keys)
    return index


def semantic_neighbours(vectors: np.ndarray, k: int = 10, groups: np.ndarray | None = None,
                        nprobe: int = 32, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For vectors ``[n, d]``: the ``k`` rows of highest cosine similarity to each row (best first,
    ``-1`` where fewer exist) and their similarities. A row is never its own neighbour (whatever
    ties do), zero rows (no text) neither have nor are neighbours, and with ``groups`` a row's
    neighbours come from other groups only, or, with ``order`` too, from other groups and from
    rows of its own group that come strictly before it in ``order`` (a user's earlier prefixes:
    its later ones contain its target). Exact up to :data:`EXACT_UP_TO` rows, IVF beyond.

    Runs on one thread whatever the caller's setting: with several, Faiss orders tied candidates
    (rows with identical vectors, common among prefixes made of the same items) and trains the IVF
    differently by thread count, so a run resumed at another thread count would read other
    neighbours (measured on Beauty's 131,413 prefixes: 1.9% of rows differed between 1 and 2
    threads). Cached tables are keyed by their inputs, so one built before this rule is still read."""
    if order is not None and groups is None:
        raise ValueError("order applies within groups: pass groups too")
    with one_thread():
        return _semantic_neighbours(vectors, k, groups, nprobe, order)


def _semantic_neighbours(vectors: np.ndarray, k: int, groups: np.ndarray | None, nprobe: int,
                         order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    keys = normalized(np.ascontiguousarray(vectors, dtype=np.float32))
    n = len(keys)
    out_rows = np.full((n, k), -1, dtype=np.int64)
    out_sim = np.zeros((n, k), dtype=np.float32)
    ids = np.flatnonzero(np.linalg.norm(keys, axis=1) > 0)
    if len(ids) < 2:
        return out_rows, out_sim
    index = _index(keys[ids], nprobe)
    group_sizes = np.bincount(groups[ids]) if groups is not None else None
    todo = np.arange(len(ids))
    fetch = k + 1 + (int(min(group_sizes.max(), 64)) if group_sizes is not None else 0)
    while len(todo):
        width = min(fetch, len(ids))
        sims, found = index.search(keys[ids[todo]], width)
        rows = np.where(found >= 0, ids[np.maximum(found, 0)], -1)
        keep = (found >= 0) & (rows != ids[todo][:, None])
        if groups is not None:
            other = groups[np.maximum(rows, 0)] != groups[ids[todo]][:, None]
            if order is not None:
                other |= order[np.maximum(rows, 0)] < order[ids[todo]][:, None]
            keep &= other
        picked, mask = first_k(rows, keep, k)
        kept_first = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        picked_sim = np.take_along_axis(sims, kept_first, axis=1)
        out_rows[ids[todo]] = picked
        out_sim[ids[todo], :picked_sim.shape[1]] = np.where(mask[:, :picked_sim.shape[1]], picked_sim, 0.0)
        short = mask.sum(1) < k
        if width >= min(len(ids), 4096) or not short.any():
            break  # everything searched (or enough tried): fewer than k neighbours exist
        todo, fetch = todo[short], fetch * 4  # rows whose candidates were all excluded: look further
    return out_rows, out_sim


def item_neighbours(vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """For item vectors ``[N + 1, d]`` in dense-id order (row 0 = padding): neighbour ids
    ``[N + 1, k]`` (1..N, best first, ``0`` where missing) and their cosine similarities. Items
    with a zero vector (no text) neither have nor are neighbours; exact search."""
    vectors = np.array(vectors, dtype=np.float32)
    vectors[0] = 0.0
    rows, sims = semantic_neighbours(vectors, k)
    return np.maximum(rows, 0), sims
