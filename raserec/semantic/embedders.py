"""Text embedders and the on-disk cache every embedding matrix goes through.

The cache key is sha256 over (embedder id, its weights hash, its parameters, the input texts),
so an interrupted run resumes from what was written and a changed input never reuses a stale
matrix. ``HashEmbedder`` (feature hashing of word unigrams and bigrams, no weights) is the fast,
dependency-free embedder for tests and baselines.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+")


class TextEmbedder(Protocol):
    """Maps texts to L2-normalised float32 vectors ``[n, dim]``."""

    dim: int

    def identity(self) -> dict[str, object]:
        """What determines the vectors: name, weights hash, parameters (the cache key)."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class HashEmbedder:
    """Feature hashing: each lowercase word and word bigram adds a signed unit to one of ``dim``
    buckets (blake2b of the token, seeded); rows are L2-normalised, empty texts stay zero.

    Args:
        dim: vector size.
        seed: changes the hash functions (another seed, other buckets).
    """

    def __init__(self, dim: int = 256, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.seed = seed

    def identity(self) -> dict[str, object]:
        return {"name": "hash", "weights": None, "dim": self.dim, "seed": self.seed}

    def _bucket(self, token: str) -> tuple[int, float]:
        digest = hashlib.blake2b(token.encode(), digest_size=8, salt=self.seed.to_bytes(8, "little")).digest()
        value = int.from_bytes(digest, "little")
        return value % self.dim, 1.0 if (value >> 63) & 1 else -1.0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _TOKEN.findall(text.lower())
            for token in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
                col, sign = self._bucket(token)
                out[row, col] += sign
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norm, out=np.zeros_like(out), where=norm > 0)


def cache_key(embedder: TextEmbedder, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(json.dumps(embedder.identity(), sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def embed_cached(embedder: TextEmbedder, texts: Sequence[str], cache_dir: str | Path | None) -> np.ndarray:
    """``embedder.embed(texts)``, read from / written to ``cache_dir/<key>.npy`` when given."""
    if cache_dir is None:
        return embedder.embed(texts)
    path = Path(cache_dir) / f"embeddings-{cache_key(embedder, texts)[:32]}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    vectors = embedder.embed(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors, allow_pickle=False)
    tmp.replace(path)
    return vectors
