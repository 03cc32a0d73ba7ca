"""Semantic item neighbours: the k most cosine-similar items of each item, itself excluded."""

from __future__ import annotations

import numpy as np

from raserec.memory.bank import _normalized
from raserec.memory.faiss_import import faiss


def item_neighbours(vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """For vectors ``[N + 1, d]`` in dense-id order (row 0 = padding): neighbour ids ``[N + 1, k]``
    (1..N, best first, ``0`` where missing) and their cosine similarities. Items with a zero
    vector (no text) neither have nor are neighbours; exact search (faiss flat inner product)."""
    keys = _normalized(np.ascontiguousarray(vectors, dtype=np.float32))
    has = np.linalg.norm(keys, axis=1) > 0
    has[0] = False
    ids = np.flatnonzero(has)
    out_ids = np.zeros((len(keys), k), dtype=np.int64)
    out_sim = np.zeros((len(keys), k), dtype=np.float32)
    if len(ids) < 2:
        return out_ids, out_sim
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys[ids])
    sims, rows = index.search(keys[ids], min(k + 1, len(ids)))
    found = np.where(rows >= 0, ids[np.maximum(rows, 0)], 0)
    not_self = found != ids[:, None]
    # Drop the item itself (wherever ties put it) and keep the first k others, in order.
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(found, order, axis=1)
    picked_sim = np.take_along_axis(sims, order, axis=1)
    keep = np.take_along_axis(not_self, order, axis=1)
    width = picked.shape[1]
    out_ids[ids, :width] = np.where(keep, picked, 0)
    out_sim[ids, :width] = np.where(keep, picked_sim, 0.0)
    return out_ids, out_sim
