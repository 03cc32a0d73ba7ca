"""The memory bank: reference <prefix, target> pairs encoded by the frozen encoder, searchable
with faiss, filtered so a query never sees its own pair or its own user's future.

An entry holds
    key      h / ||h||  (in the faiss index; inner product = cosine similarity), or, when the bank
             is built with a key function, that function's vector of the entry, normalised the
             same way (e.g. collaborative and semantic similarity mixed: ``raserec.semantic.keys``)
    payload  h (unnormalised, float32), the target item id, the user id and the prefix end.

Pure code (no Lightning): :class:`raserec.memory.callback.MemoryBankCallback` decides when a bank
is built, the RAFT module only calls :meth:`MemoryBank.search` and :meth:`MemoryBank.gather`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from raserec.checkpoint import state_fingerprint
from raserec.data.batch import PairDataset
from raserec.errors import CheckpointError, ConfigError, read_json_object
from raserec.memory.faiss_import import faiss
from raserec.models.encoders.base import SequenceEncoder
from raserec.outputs import replacing

log = logging.getLogger(__name__)

IndexKind = Literal["ivf_flat", "flat", "ivf_pq", "auto"]
#: faiss's rule of thumb: k-means wants at least this many training points per centroid (#414).
MIN_POINTS_PER_CENTROID = 39
FORMAT_VERSION = 1
_MANIFEST, _INDEX, _PAYLOAD = "manifest.json", "index.faiss", "payload.npz"
_END_SPAN = 1 << 31  # user * _END_SPAN + end orders entries by (user, end) in one int64


@dataclass(frozen=True)
class IndexConfig:
    """How the bank's faiss index is built and searched.

    Attributes:
        kind: ``ivf_flat`` (the authors' IndexIVFFlat), ``flat`` (exact search), ``ivf_pq``
            (compressed, for large banks) or ``auto`` (kind, nlist and nprobe chosen by the
            bank's size, :func:`auto_index`; ``nlist`` and ``nprobe`` here are then ignored).
        nlist: inverted lists (IVF centroids); shrunk when the bank is too small to train them.
        nprobe: lists visited per query (1 in the paper; higher = better recall, slower).
        pq_m: ``ivf_pq`` sub-quantizers (must divide the hidden size).
        pq_bits: ``ivf_pq`` bits per sub-quantizer code.
        overfetch: ``None`` (default): each query fetches exactly ``k`` plus the number of its own
            user's entries the filter will drop (counted in advance, rounded up to a power of
            two), so at least ``k`` survive whenever the index has them; same neighbours as any
            larger over-fetch, at the cost of a small one. An int ``m``: the authors' fixed
            over-fetch of ``m * k`` (they use 4), re-searched larger for rows left short.
        seed: k-means seed, so every process (DDP rank) builds the same index.
    """

    kind: IndexKind = "ivf_flat"
    nlist: int = 128
    nprobe: int = 1
    pq_m: int = 8
    pq_bits: int = 8
    overfetch: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("ivf_flat", "flat", "ivf_pq", "auto"):
            raise ConfigError(f"unknown index kind {self.kind!r}; use ivf_flat, flat, ivf_pq or auto")
        for name in ("nlist", "nprobe", "pq_m", "pq_bits", "overfetch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


#: ``index: auto`` thresholds, from ``results/bank_scale.json`` (keys of the trained Beauty encoder,
#: 2 cores): exact search costs 0.5 s per 1024 queries at 131k entries and 5 s at 1M, so it is
#: kept for small banks only; IVF-Flat with nlist = 4 sqrt(n) and nprobe 8 reached recall@20 0.95
#: at 131k (0.99 at 1M) for 16-34 ms per 1024 queries; IVF-PQ (8-byte codes) lost most of the
#: recall (0.36-0.61), so it is chosen only where IVF-Flat no longer fits in memory.
AUTO_FLAT_MAX = 50_000
AUTO_IVF_FLAT_MAX = 50_000_000
AUTO_NPROBE = 8


def ivf_nlist(n: int) -> int:
    """IVF lists for ``n`` entries: 4 sqrt(n) as a power of two, within [128 (the paper's), 4096]
    (more lists make k-means on two cores cost more than they save)."""
    return min(4096, max(128, 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))))


def auto_index(n: int) -> tuple[str, int, int]:
    """``(kind, nlist, nprobe)`` of ``index: auto`` for a bank of ``n`` entries."""
    if n <= AUTO_FLAT_MAX:
        return "flat", 0, 1
    nlist = ivf_nlist(n)
    if n <= AUTO_IVF_FLAT_MAX:
        return "ivf_flat", nlist, AUTO_NPROBE
    return "ivf_pq", nlist, 4 * AUTO_NPROBE


# ----------------------------------------------------------------------------- helpers
class KeyFunction(Protocol):
    """Search keys of sequences from their frozen-encoder ``h`` ``[B, d]`` and item ids ``[B, T]``
    (what a bank built with it is searched by); ``fingerprint`` names it in the bank's manifest."""

    fingerprint: str

    def __call__(self, h: Tensor, input_ids: Tensor) -> Tensor: ...


def keys_fingerprint(encoder: torch.nn.Module, key_fn: KeyFunction | None = None) -> str:
    """What a bank's keys are a function of: the encoder's weights, and the key function if any."""
    encoder_print = state_fingerprint(encoder)
    return encoder_print if key_fn is None else f"{encoder_print}+{key_fn.fingerprint}"


def _f32(x: Tensor | np.ndarray) -> np.ndarray:
    """float32, C-contiguous numpy copy-if-needed (what faiss accepts)."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _i64(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.int64).reshape(-1)


def normalized(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation into a new array; zero rows stay zero (never NaN)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(np.divide(x, norm, out=np.zeros_like(x), where=norm > 0))


def first_k(rows: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first ``k`` kept candidates in their (best-first) order; ``-1``/False pads."""
    b, width = rows.shape
    # A stable sort of "not kept" moves kept columns to the front without reordering them.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(rows, order, axis=1)
    mask = np.take_along_axis(keep, order, axis=1)
    picked = np.where(mask, picked, -1)
    if width < k:
        picked = np.concatenate([picked, np.full((b, k - width), -1, np.int64)], axis=1)
        mask = np.concatenate([mask, np.zeros((b, k - width), bool)], axis=1)
    return picked, mask


def encoder_device(encoder: torch.nn.Module) -> torch.device:
    return next(encoder.parameters()).device


def length_batches(lengths: np.ndarray, batch_size: int, token_budget: int) -> tuple[np.ndarray, list[slice]]:
    """Rows ordered by length and the batches to encode them in: each batch holds prefixes of
    one length only, at most ``batch_size`` of them and at most ``token_budget`` tokens (at
    least one row). One length means no padding and no mask beyond causality, and a batch this
    size keeps the feed-forward's ``[tokens, inner]`` activations in cache: on the 2-core CPU the
    131k Beauty prefixes encode several times faster than in 2048-row batches of mixed lengths."""
    order = np.argsort(lengths, kind="stable")
    if len(order) == 0:
        return order, []
    sorted_lengths = lengths[order]
    bounds = np.r_[0, np.flatnonzero(np.diff(sorted_lengths)) + 1, len(order)]
    batches = []
    for lo, hi in itertools.pairwise(bounds.tolist()):
        step = max(1, min(batch_size, token_budget // max(1, int(sorted_lengths[lo]))))
        batches += [slice(s, min(s + step, hi)) for s in range(lo, hi, step)]
    return order, batches


@torch.no_grad()
def encode_pairs(
    encoder: SequenceEncoder,
    dataset: PairDataset,
    batch_size: int = 2048,
    device: torch.device | str | None = None,
    progress: bool = True,
    token_budget: int = 4096,
) -> np.ndarray:
    """h of every pair's prefix, ``[P, d]`` float32, with the encoder in eval mode (restored after).

    Prefixes are encoded in batches of one length (:func:`length_batches`): at most
    ``batch_size`` prefixes and ``token_budget`` tokens per batch.
    """
    n = len(dataset)
    device = torch.device(device) if device is not None else encoder_device(encoder)
    out = torch.empty(n, encoder.hidden_size, dtype=torch.float32)
    order, batches = length_batches(np.minimum(dataset.pairs.end, dataset.max_len), batch_size, token_budget)
    order = torch.from_numpy(order)
    was_training = encoder.training
    encoder.eval()
    try:
        for batch in tqdm(batches, desc="memory bank: encoding", unit="batch", disable=not progress, leave=False):
            rows = order[batch]
            out[rows] = encoder(dataset.prefixes(rows).to(device)).float().cpu()
    finally:
        encoder.train(was_training)
    return out.numpy()


# ----------------------------------------------------------------------------- the bank
class MemoryBank:
    """A faiss index over normalised keys (h itself by default) plus the payload arrays,
    row-aligned with the index ids.

    Build one with :meth:`build` (encode a :class:`PairDataset`) or :meth:`from_arrays`.

    Args:
        dim: hidden size d.
        config: index settings.
        encoder_fingerprint: :func:`raserec.checkpoint.state_fingerprint` of the encoder whose
            h the bank holds (checked by :meth:`load`; with a key function, combined with the
            function's fingerprint).
        reference_version: the datamodule's ``reference_version`` of the stored pairs.
        key_dim: the size of separate search keys (``None``: the keys are h, of size ``dim``);
            queries are then searched with keys of this size, and :attr:`keys` holds the entries'.
    """

    def __init__(self, dim: int, config: IndexConfig | None = None, encoder_fingerprint: str | None = None,
                 reference_version: str | None = None, key_dim: int | None = None) -> None:
        self.dim = int(dim)
        self.config = config or IndexConfig()
        self.encoder_fingerprint = encoder_fingerprint
        self.reference_version = reference_version
        self.key_dim = int(key_dim) if key_dim is not None else self.dim
        #: The entries' search keys when they are not h (``None``: h is the key).
        self.keys: np.ndarray | None = None if key_dim is None else np.empty((0, self.key_dim), np.float32)
        self.h = np.empty((0, self.dim), np.float32)
        self.users = np.empty(0, np.int64)
        self.ends = np.empty(0, np.int64)
        self.targets = np.empty(0, np.int64)
        self.index: Any = None
        self._quantizer: Any = None
        self.kind: IndexKind = "flat"  # the kind actually built (may differ from config.kind)
        self.nlist = 0  # effective number of lists (0 for flat)
        self.build_seconds = 0.0
        self._user_end: np.ndarray | None = None  # sorted user * 2^31 + end, for own_future_count
        self._self_neighbours: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # k -> (rows, mask), see below

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_arrays(cls, h: Tensor | np.ndarray, users: Tensor | np.ndarray, ends: Tensor | np.ndarray,
                    targets: Tensor | np.ndarray, config: IndexConfig | None = None,
                    encoder_fingerprint: str | None = None, reference_version: str | None = None,
                    keys: Tensor | np.ndarray | None = None) -> MemoryBank:
        """Train the index on the keys (``keys``, default ``h``; k-means for IVF) and add every entry."""
        start = time.perf_counter()
        h = _f32(h)
        if h.ndim != 2:
            raise ValueError(f"h must be [P, d], got shape {h.shape}")
        keys = None if keys is None else _f32(keys)
        if keys is not None and (keys.ndim != 2 or len(keys) != len(h)):
            raise ValueError(f"keys must be [P, d'] with P = {len(h)}, got shape {keys.shape}")
        bank = cls(h.shape[1], config, encoder_fingerprint, reference_version,
                   key_dim=None if keys is None else keys.shape[1])
        bank._create_index(normalized(h if keys is None else keys))
        bank.add(h, users, ends, targets, keys)
        bank.build_seconds = time.perf_counter() - start
        return bank

    @classmethod
    def build(cls, encoder: SequenceEncoder, dataset: PairDataset, config: IndexConfig | None = None, *,
              batch_size: int = 2048, device: torch.device | str | None = None, progress: bool = True,
              reference_version: str | None = None, key_fn: KeyFunction | None = None) -> MemoryBank:
        """Encode every pair of ``dataset`` with the (frozen) ``encoder`` and index them (by
        ``key_fn(h, prefixes)`` when given, else by h)."""
        start = time.perf_counter()
        h = encode_pairs(encoder, dataset, batch_size, device, progress)
        pairs = dataset.pairs
        keys = None
        if key_fn is not None:
            keys = torch.cat([key_fn(torch.from_numpy(h[rows.numpy()]), dataset.prefixes(rows)).float()
                              for rows in torch.arange(len(dataset)).split(batch_size)]) if len(dataset) else None
        bank = cls.from_arrays(h, pairs.user, pairs.end, pairs.target, config, keys_fingerprint(encoder, key_fn),
                               reference_version, keys)
        bank.build_seconds = time.perf_counter() - start
        return bank

    def subset(self, keep: np.ndarray) -> MemoryBank:
        """A new bank of the entries where ``keep`` (bool ``[n]``) is True, with the same keys,
        settings and fingerprints (its index is trained on those entries)."""
        keys = None if self.keys is None else self.keys[keep]
        return MemoryBank.from_arrays(self.h[keep], self.users[keep], self.ends[keep], self.targets[keep],
                                      self.config, self.encoder_fingerprint, self.reference_version, keys)

    def _create_index(self, keys: np.ndarray) -> None:
        """Choose and train the index for ``keys`` (normalised), shrinking IVF when too small."""
        n, d, cfg = len(keys), self.key_dim, self.config
        kind, nlist, nprobe = auto_index(n) if cfg.kind == "auto" else (cfg.kind, cfg.nlist, cfg.nprobe)
        if kind == "ivf_pq":
            if d % cfg.pq_m:
                raise ConfigError(f"ivf_pq: pq_m={cfg.pq_m} does not divide the hidden size {d}")
            needed = MIN_POINTS_PER_CENTROID * max(nlist, 2 ** cfg.pq_bits)
            if n < needed:
                log.warning("memory bank: %d entries are too few to train ivf_pq (needs %d); using ivf_flat",
                            n, needed)
                kind = "ivf_flat"
        if kind != "flat":
            fit = n // MIN_POINTS_PER_CENTROID
            if fit < 2:
                if n:
                    log.warning("memory bank: %d entries are too few for an IVF index; using exact flat search", n)
                kind = "flat"
            elif fit < nlist:
                log.warning("memory bank: %d entries are too few for nlist=%d (faiss wants %d per list); "
                            "using nlist=%d", n, nlist, MIN_POINTS_PER_CENTROID, fit)
                nlist = fit
        metric = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
            self._quantizer = None
            nlist = 0
        else:
            self._quantizer = faiss.IndexFlatIP(d)  # kept referenced: the IVF index does not own it
            if kind == "ivf_flat":
                index = faiss.IndexIVFFlat(self._quantizer, d, nlist, metric)
            else:
                index = faiss.IndexIVFPQ(self._quantizer, d, nlist, cfg.pq_m, cfg.pq_bits, metric)
                index.pq.cp.seed = cfg.seed
            index.cp.seed = cfg.seed  # deterministic k-means: every rank builds the same index
            index.train(keys)
            index.nprobe = min(nprobe, nlist)
        self.index, self.kind, self.nlist = index, kind, nlist

    def add(self, h: Tensor | np.ndarray, users: Tensor | np.ndarray, ends: Tensor | np.ndarray,
            targets: Tensor | np.ndarray, keys: Tensor | np.ndarray | None = None) -> None:
        """Append entries (the dynamic memory bank): no encoder retraining, no index retraining.
        A bank with separate keys needs the new entries' ``keys`` too."""
        h = _f32(h)
        users, ends, targets = _i64(users), _i64(ends), _i64(targets)
        if h.ndim != 2 or h.shape[1] != self.dim:
            raise ValueError(f"h must be [P, {self.dim}], got shape {h.shape}")
        if not len(h) == len(users) == len(ends) == len(targets):
            raise ValueError("h, users, ends and targets must have the same length")
        if (keys is None) != (self.keys is None):
            raise ValueError("this bank's keys are h: pass no keys" if self.keys is None
                             else "this bank has separate keys: pass the new entries' keys")
        if keys is not None:
            keys = _f32(keys)
            if keys.shape != (len(h), self.key_dim):
                raise ValueError(f"keys must be [{len(h)}, {self.key_dim}], got shape {keys.shape}")
        index_keys = h if keys is None else keys
        if self.index is None:
            self._create_index(normalized(index_keys))
        if len(h):
            self.index.add(normalized(index_keys))
        if keys is not None:
            self.keys = np.concatenate([self.keys, keys]) if len(self.keys) else keys
        self.h = np.concatenate([self.h, h]) if len(self.h) else h
        self.users = np.concatenate([self.users, users])
        self.ends = np.concatenate([self.ends, ends])
        self.targets = np.concatenate([self.targets, targets])
        self._user_end = None
        self._self_neighbours.clear()

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.users)

    @property
    def nprobe(self) -> int:
        return int(self.index.nprobe) if self.nlist else 0

    def set_nprobe(self, nprobe: int) -> None:
        """Lists visited per query (IVF only; ignored by flat indexes)."""
        if self.nlist:
            self.index.nprobe = max(1, min(int(nprobe), self.nlist))
        self._self_neighbours.clear()

    def own_future_count(self, users: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """How many entries the leakage filter drops for each query: entries of the query's
        user that end at or after the query's end (one binary search per query)."""
        if self._user_end is None:
            self._user_end = np.sort(self.users * _END_SPAN + self.ends)
        base = users * _END_SPAN
        hi = np.searchsorted(self._user_end, base + (_END_SPAN - 1), side="right")
        lo = np.searchsorted(self._user_end, base + np.clip(ends, 0, _END_SPAN - 1), side="left")
        return (hi - lo).astype(np.int64)

    def _filtered(self, keys: np.ndarray, users: np.ndarray, ends: np.ndarray,
                  fetch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw search of ``fetch`` candidates; ``keep`` marks the allowed ones."""
        _, rows = self.index.search(keys, fetch)
        valid = rows >= 0  # faiss pads with -1 when a probed list runs out: never a real row
        safe = np.where(valid, rows, 0)
        # No leakage: drop the query's own pair and every pair of its user that ends at or
        # after the query's end (that pair's prefix would contain the query's target).
        own_future = (self.users[safe] == users[:, None]) & (self.ends[safe] >= ends[:, None])
        keep = valid & ~own_future
        exhausted = ~valid.all(axis=1)  # the index had no more candidates for this row
        return rows, keep, exhausted

    def search(self, query_h: Tensor | np.ndarray, query_user: Tensor | np.ndarray,
               query_end: Tensor | np.ndarray, k: int, overfetch: int | None = None,
               max_rounds: int = 4) -> tuple[Tensor, Tensor]:
        """The ``k`` most similar allowed entries of each query (``query_h``: the queries' keys,
        h unless the bank was built with a key function).

        Returns ``rows`` ``[B, k]`` int64 (bank rows, ``-1`` in empty slots) and ``mask``
        ``[B, k]`` bool (True = a real neighbour), best first. How many candidates are fetched
        before filtering: see :attr:`IndexConfig.overfetch` (``overfetch`` overrides it). In the
        fixed mode, rows left with fewer than ``k`` are searched again with a 4x larger fetch
        (at most ``max_rounds`` times) unless the index ran out of candidates.
        """
        keys = _f32(query_h)
        users, ends = _i64(query_user), _i64(query_end)
        b = len(users)
        if keys.ndim != 2 or len(keys) != b or len(ends) != b:
            raise ValueError("query_h must be [B, d] and query_user/query_end [B]")
        if k <= 0 or len(self) == 0 or b == 0:
            k = max(k, 0)
            return torch.full((b, k), -1, dtype=torch.int64), torch.zeros(b, k, dtype=torch.bool)
        if keys.shape[1] != self.key_dim:
            raise ValueError(f"query keys have dimension {keys.shape[1]}, the bank's keys {self.key_dim}")
        keys = normalized(keys)
        n = len(self)
        overfetch = overfetch if overfetch is not None else self.config.overfetch
        out_rows = np.full((b, k), -1, np.int64)
        out_mask = np.zeros((b, k), bool)
        if overfetch is None:
            # Exact need: k + the entries the filter will drop. Rounded up to powers of two so
            # a batch needs only a handful of faiss calls (one per distinct fetch size).
            drop = self.own_future_count(users, ends)
            pad = np.where(drop > 0, 2 ** np.ceil(np.log2(np.maximum(drop, 1))), 0).astype(np.int64)
            fetch = np.minimum(k + pad, n)
            for size in np.unique(fetch):
                idx = np.flatnonzero(fetch == size)
                rows, keep, _ = self._filtered(keys[idx], users[idx], ends[idx], int(size))
                out_rows[idx], out_mask[idx] = first_k(rows, keep, k)
            return torch.from_numpy(out_rows), torch.from_numpy(out_mask)
        size = min(n, k * overfetch)
        rows, keep, exhausted = self._filtered(keys, users, ends, size)
        out_rows, out_mask = first_k(rows, keep, k)
        # Users with long histories can have more than (overfetch - 1) * k of their own future
        # pairs among the candidates: fetch more for just those rows (vectorised per round).
        for _ in range(max_rounds):
            short = (out_mask.sum(axis=1) < k) & ~exhausted
            if size >= n or not short.any():
                break
            size = min(n, size * 4)
            idx = np.flatnonzero(short)
            r2, k2, e2 = self._filtered(keys[idx], users[idx], ends[idx], size)
            out_rows[idx], out_mask[idx] = first_k(r2, k2, k)
            exhausted[idx] = e2
        return torch.from_numpy(out_rows), torch.from_numpy(out_mask)

    def self_neighbours(self, k: int, chunk: int = 16384, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` for every entry of the bank used as a query (its own key, user and end):
        ``rows`` ``[n, k]`` and ``mask`` ``[n, k]``, row ``i`` belonging to entry ``i``.

        RAFT's training queries are exactly the fit bank's entries, and with a frozen encoder and a
        bank that does not change between rebuilds their memories are fixed: they are searched
        once here (cached per ``k`` until :meth:`add` or :meth:`set_nprobe` changes the answer)
        instead of once per query per epoch. Same rows as per-batch :meth:`search` calls, since
        every query is searched and filtered independently.
        """
        if k not in self._self_neighbours:
            n = len(self)
            keys = self.h if self.keys is None else self.keys
            rows = np.full((n, k), -1, np.int64)
            mask = np.zeros((n, k), bool)
            for start in tqdm(range(0, n, chunk), desc="memory bank: retrieving for training queries",
                              unit="chunk", disable=not progress, leave=False):
                stop = min(start + chunk, n)
                r, m = self.search(keys[start:stop], self.users[start:stop], self.ends[start:stop], k)
                rows[start:stop], mask[start:stop] = r.numpy(), m.numpy()
            self._self_neighbours[k] = (rows, mask)
        return self._self_neighbours[k]

    def gather(self, rows: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Payload of the retrieved rows: ``h_k`` ``[B, k, d]`` float32 and target ids ``[B, k]``
        int64, zeros where ``mask`` is False. CPU tensors."""
        rows_np, mask_np = rows.cpu().numpy(), mask.cpu().numpy()
        b, k = rows_np.shape
        if len(self) == 0 or k == 0:
            return torch.zeros(b, k, self.dim), torch.zeros(b, k, dtype=torch.int64)
        safe = np.where(mask_np, rows_np, 0).reshape(-1)  # -1 (empty) never indexes a real row
        h = np.take(self.h, safe, axis=0).reshape(b, k, self.dim)  # np.take: ~10x torch indexing
        h[~mask_np] = 0.0
        targets = np.where(mask_np, self.targets[safe].reshape(b, k), 0)
        return torch.from_numpy(h), torch.from_numpy(targets)

    def retrieve(self, query_h: Tensor, query_user: Tensor, query_end: Tensor, k: int,
                 device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`search` then :meth:`gather`: ``h_k`` ``[B, k, d]``, target ids ``[B, k]`` and
        the mask ``[B, k]`` of the ``k`` allowed memories of each query, on ``device``."""
        rows, mask = self.search(query_h, query_user, query_end, k)
        h_k, targets = self.gather(rows, mask)
        return h_k.to(device), targets.to(device), mask.to(device)

    # ---------------------------------------------------------------- persistence
    def manifest(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "encoder_fingerprint": self.encoder_fingerprint,
            "reference_version": self.reference_version,
            "size": len(self),
            "dim": self.dim,
            "key_dim": None if self.keys is None else self.key_dim,
            "index_kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "config": asdict(self.config),
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss``, ``payload.npz`` and ``manifest.json`` (last, so a partial save
        is never mistaken for a complete one)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _MANIFEST).unlink(missing_ok=True)
        if self.index is None:  # a bank that never saw an entry: save an empty exact index
            self._create_index(np.empty((0, self.dim), np.float32))
        faiss.write_index(self.index, str(directory / _INDEX))
        extra = {} if self.keys is None else {"keys": self.keys}
        np.savez(directory / _PAYLOAD, h=self.h, users=self.users, ends=self.ends, targets=self.targets, **extra)
        with replacing(directory / _MANIFEST) as tmp:
            tmp.write_text(json.dumps(self.manifest(), indent=2) + "\n")
        return directory

    @staticmethod
    def read_manifest(directory: str | Path) -> dict[str, Any]:
        path = Path(directory) / _MANIFEST
        if not path.is_file():
            raise CheckpointError(f"{directory}: no memory bank here (missing {_MANIFEST})")
        manifest = read_json_object(path, "memory bank manifest", CheckpointError)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: memory bank format {manifest.get('format_version')} != {FORMAT_VERSION}")
        return manifest

    @classmethod
    def load(cls, directory: str | Path, expected_encoder: SequenceEncoder | str | None = None,
             expected_reference_version: str | None = None) -> MemoryBank:
        """Read a saved bank, refusing a stale one: ``expected_encoder`` (an encoder or its
        :func:`state_fingerprint`) and ``expected_reference_version`` must match the manifest."""
        directory = Path(directory)
        manifest = cls.read_manifest(directory)
        check_manifest(manifest, directory, expected_encoder, expected_reference_version)
        known = {f.name for f in fields(IndexConfig)}
        config = IndexConfig(**{k: v for k, v in manifest["config"].items() if k in known})
        bank = cls(manifest["dim"], config, manifest["encoder_fingerprint"], manifest["reference_version"],
                   key_dim=manifest.get("key_dim"))
        try:
            bank.index = faiss.read_index(str(directory / _INDEX))
            with np.load(directory / _PAYLOAD) as payload:
                bank.h = np.ascontiguousarray(payload["h"], np.float32)
                bank.users, bank.ends, bank.targets = (payload[k].astype(np.int64) for k in ("users", "ends", "targets"))
                if bank.keys is not None:
                    bank.keys = np.ascontiguousarray(payload["keys"], np.float32)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{directory}: damaged memory bank ({type(exc).__name__}: {exc})") from exc
        bank.kind, bank.nlist = manifest["index_kind"], manifest["nlist"]
        if not bank.index.ntotal == len(bank.h) == len(bank.users) == manifest["size"] or (
                bank.keys is not None and len(bank.keys) != len(bank.h)):
            raise CheckpointError(f"{directory}: index has {bank.index.ntotal} entries, payload {len(bank.h)}, "
                                  f"manifest {manifest['size']}")
        bank.set_nprobe(manifest["nprobe"])
        return bank


def check_manifest(manifest: dict[str, Any], directory: str | Path, expected_encoder: SequenceEncoder | str | None,
                   expected_reference_version: str | None) -> None:
    """Raise :class:`CheckpointError` when a saved bank belongs to another encoder or reference set."""
    if expected_encoder is not None:
        expected = expected_encoder if isinstance(expected_encoder, str) else state_fingerprint(expected_encoder)
        found = manifest.get("encoder_fingerprint")
        if found != expected:
            raise CheckpointError(
                f"{directory}: stale memory bank: it was built with encoder {str(found)[:12]}, but the current "
                f"encoder is {expected[:12]}; delete it or point save_dir elsewhere so it is rebuilt"
            )
    if expected_reference_version is not None and manifest.get("reference_version") != expected_reference_version:
        raise CheckpointError(
            f"{directory}: stale memory bank: it holds reference set {manifest.get('reference_version')}, but the "
            f"data's reference set is {expected_reference_version} (data or split changed); delete it to rebuild"
        )
