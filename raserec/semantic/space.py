"""The semantic space of a dataset: item texts -> (LLM step) -> embeddings -> neighbours, and the
same for user prefixes. What SRA-CL and GRASP read; built once per (config, data) and cached on
disk (every text and matrix under a key of its inputs).

Leakage rule: prefix texts and vectors are built from *training prefixes* (``v1..vt``,
``t <= n - 3``), which never contain a validation or test target; a user's training-part vector
(GRASP's user bank) reads the last ``prefix_window`` of the first ``n - 2`` items (the
validation query's input).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from raserec.data.split import PairSet
from raserec.errors import ConfigError, check
from raserec.semantic.embedders import embed_cached, load_checked, make_embedder, save_checked
from raserec.semantic.generators import generate_cached, make_generator
from raserec.semantic.neighbours import item_neighbours, semantic_neighbours
from raserec.semantic.text import item_text_path, item_titles, load_item_text, prefix_texts, render_items

if TYPE_CHECKING:
    from raserec.data.datamodule import SequenceDataModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SemanticConfig:
    """Where item and user semantics come from."""

    text_source: str = "auto"
    """Item text: ``auto`` (``<data>.items.jsonl`` beside the data), or a path to an
    ``.items.jsonl``, a RecBole ``.item`` or an Amazon ``meta_*.json(.gz)`` file."""
    generator: Literal["template", "precomputed", "openai_compatible"] = "template"
    """The LLM step: ``template`` (no LLM: the fields as text), ``precomputed`` (a JSONL of
    responses, ``generator_path``) or ``openai_compatible`` (``base_url`` + ``llm_model``)."""
    generator_path: str | None = None
    """Responses file of the ``precomputed`` generator."""
    base_url: str | None = None
    """Chat-completions endpoint of the ``openai_compatible`` generator."""
    llm_model: str | None = None
    """Model name served at ``base_url``."""
    embedder: Literal["hash", "minilm", "wordllama"] = "minilm"
    """Text encoder: ``minilm`` (384-d), ``wordllama`` (256-d) or ``hash`` (tests)."""
    k: int = 10
    """Neighbours per item and per prefix (both papers: 10)."""
    prefix_vectors: Literal["text", "mean_items"] = "text"
    """A prefix's vector: its title list embedded as text (SRA-CL's user text without the LLM), or
    the normalised mean of its items' vectors (no text encoder pass per prefix)."""
    prefix_window: int = 20
    """Most recent items of a prefix that make its vector: rendered into its text, or averaged
    (``mean_items``; also GRASP's user vectors). SRA-CL: 20."""
    exclude_same_user: bool = True
    """A prefix's neighbours come from other users; ``false``: also from the same user's shorter
    prefixes. Its longer ones contain its target and are never neighbours (the official SRA-CL
    code excludes only the exact prefix, so a longer prefix could be a positive)."""
    cache_dir: str = ".cache/semantic"
    """Texts, embeddings and neighbour tables are cached here, keyed by their inputs."""

    def __post_init__(self) -> None:
        check(self.k >= 1, f"semantic.k must be >= 1, got {self.k}")
        check(self.prefix_window >= 1, f"semantic.prefix_window must be >= 1, got {self.prefix_window}")
        if self.prefix_vectors not in ("text", "mean_items"):
            raise ConfigError(f"semantic.prefix_vectors must be 'text' or 'mean_items', got {self.prefix_vectors!r}")

    def label(self) -> str:
        """How the text was made, for results rows (e.g. ``items.jsonl fields, template (no LLM) + minilm``)."""
        source = "items.jsonl fields" if self.text_source == "auto" else Path(self.text_source).name
        llm = {"template": "template (no LLM)", "precomputed": "precomputed responses"}.get(
            self.generator, f"LLM {self.llm_model}")
        return f"{source}, {llm} + {self.embedder}"


def semantic_configs(module: object, stage: str = "fit") -> list[SemanticConfig]:
    """The semantic settings ``module`` reads at ``stage``: its own ``semantic`` (GRASP, semantic
    memory keys: every stage) and, when fitting, its weighted objectives' (SRA-CL's losses are
    training-only: evaluating an SRA-CL checkpoint needs no text). Empty for methods without text."""
    owners = [module]
    if stage == "fit":
        owners += [o for o in getattr(module, "objectives", []) if getattr(o, "weight", 1.0) > 0]
    return [o.semantic for o in owners if isinstance(getattr(o, "semantic", None), SemanticConfig)]


def check_item_text(module: object, data_path: str | Path, stage: str = "fit") -> None:
    """Fail with one line naming the missing file when ``module`` needs item text at ``stage``
    that the data lacks: called by the CLI before the trainer writes anything."""
    for config in semantic_configs(module, stage):
        item_text_path(config.text_source, data_path)


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part, sort_keys=True,
                                                                                 default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


class SemanticSpace:
    """Item and training-prefix semantics of one dataset (see the module docstring)."""

    def __init__(self, dm: SequenceDataModule, config: SemanticConfig, progress: bool = True) -> None:
        self.dm = dm
        self.config = config
        self.progress = progress
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else None
        self.data = dm.data
        # An item has at most N - 1 neighbours; a larger k only allocates [N + 1, k] tables of nothing.
        check(config.k < self.data.num_items,
              f"semantic.k ({config.k}) must be below the number of items ({self.data.num_items})")
        self.train = dm.pairs("train")

    # --------------------------------------------------------------- items
    @cached_property
    def features(self):
        return load_item_text(self.config.text_source, self.dm.data_path, self.data,
                              cache_dir=self.dm.cache_dir)

    @cached_property
    def item_texts(self) -> list[str]:
        """Generated (or template) text per dense item id; ``[0] == ""``."""
        prompts = render_items(self.features)
        generator = make_generator(self.config.generator, self.config.generator_path, self.config.base_url,
                                   self.config.llm_model)
        keys = [str(v) for v in self.data.item_ids]
        real = [i for i in range(1, len(prompts)) if prompts[i]]
        texts = [""] * len(prompts)
        for i, text in zip(real, generate_cached(generator, [keys[i] for i in real], [prompts[i] for i in real],
                                                 self.cache_dir, progress=self.progress), strict=True):
            texts[i] = text
        return texts

    @cached_property
    def embedder(self):
        return make_embedder(self.config.embedder)

    @cached_property
    def item_vectors(self) -> np.ndarray:
        """``[N + 1, D]`` L2-normalised item vectors (zero for padding and text-less items)."""
        return embed_cached(self.embedder, self.item_texts, self.cache_dir, progress=self.progress)

    @cached_property
    def item_neighbours(self) -> np.ndarray:
        """``[N + 1, k]`` dense ids of each item's nearest items (0 = none), best first."""
        return item_neighbours(self.item_vectors, self.config.k)[0]

    # -------------------------------------------------------------- prefixes
    def windows(self, user: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Left-padded ``[P, prefix_window]`` item ids of the prefixes ``(user, end)``."""
        pairs = PairSet(user.astype(np.int64), end.astype(np.int64), np.zeros(len(user), dtype=np.int64))
        return self.dm.pair_dataset(pairs).prefixes(torch.arange(len(user)), self.config.prefix_window).numpy()

    def prefix_vectors_of(self, user: np.ndarray, end: np.ndarray) -> np.ndarray:
        """``[P, D]`` vectors of arbitrary prefixes (cached by their content)."""
        windows = self.windows(user, end)
        if self.config.prefix_vectors == "mean_items":
            out = np.zeros((len(windows), self.item_vectors.shape[1]), dtype=np.float32)
            for s in range(0, len(windows), 8192):  # chunks bound the [chunk, W, D] gather
                out[s:s + 8192] = self.item_vectors[windows[s:s + 8192]].sum(1)
            norm = np.linalg.norm(out, axis=1, keepdims=True)
            return np.divide(out, norm, out=np.zeros_like(out), where=norm > 0)
        titles = item_titles(self.features, self.item_texts)
        return embed_cached(self.embedder, prefix_texts(titles, windows), self.cache_dir, progress=self.progress)

    @cached_property
    def prefix_vectors(self) -> np.ndarray:
        """``[P, D]`` vectors of the training prefixes (rows of ``dm.pairs("train")``)."""
        return self.prefix_vectors_of(self.train.user, self.train.end)

    @cached_property
    def prefix_neighbours(self) -> np.ndarray:
        """``[P, k]`` training-pair rows of each training prefix's nearest prefixes (-1 = none);
        the prefix itself and its user's longer prefixes (they contain its target) always
        excluded, and with ``exclude_same_user`` its user's shorter prefixes too."""
        cfg = self.config
        # The rule is part of the key: caches from before the longer-prefix exclusion never match.
        key = _digest("prefix-neighbours", cfg.k, cfg.exclude_same_user, self.prefix_vectors, self.train.user,
                      *(() if cfg.exclude_same_user else ("same user: shorter prefixes only", self.train.end)))
        path = self.cache_dir / f"neighbours-{key[:32]}.npy" if self.cache_dir else None
        if path is not None and (cached := load_checked(path, key)) is not None:
            return cached
        log.info("semantic neighbours of %d training prefixes (k=%d)", len(self.train), cfg.k)
        rows, _ = semantic_neighbours(self.prefix_vectors, cfg.k, groups=self.train.user,
                                      order=None if cfg.exclude_same_user else self.train.end)
        if path is not None:
            save_checked(path, rows, {"key": key, "what": "prefix neighbours", "config": asdict(cfg)})
        return rows

    @cached_property
    def user_vectors(self) -> np.ndarray:
        """``[U, D]`` each user's training-part vector (the last ``prefix_window`` of its first
        ``n - 2`` items)."""
        users = np.arange(self.data.num_users, dtype=np.int64)
        return self.prefix_vectors_of(users, self.data.lengths.astype(np.int64) - 2)


def trainer_datamodule(module, needs: str):
    """The datamodule of ``module``'s trainer (semantic tables come from the data); a one-line
    :class:`ConfigError` saying what ``needs`` it when there is none."""
    dm = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    if dm is None:
        raise ConfigError(f"{needs} come from the data: run the module with a datamodule")
    return dm


def mean_item_vectors(item_vectors: torch.Tensor, ids: torch.Tensor, window: int) -> torch.Tensor:
    """``mean_items`` prefix vectors in torch: the normalised sum of the vectors ``[N + 1, D]`` of
    the last ``window`` items of each left-padded row of ``ids`` ``[B, T]`` (padding and text-less
    items have zero vectors; a row with none gets a zero vector), as
    :meth:`SemanticSpace.prefix_vectors_of` computes them in numpy."""
    return F.normalize(item_vectors[ids[:, -window:]].sum(1), dim=-1)


_SPACES: dict[tuple, SemanticSpace] = {}


def semantic_space(dm: SequenceDataModule, config: SemanticConfig, progress: bool | None = None) -> SemanticSpace:
    """The (process-wide, memoised) semantic space of ``dm`` under ``config``; progress bars only
    on a terminal unless ``progress`` says otherwise (logs of background runs stay readable)."""
    if progress is None:
        progress = sys.stderr.isatty()
    key = (config, dm.data.content_hash(), str(dm.data_path))
    if key not in _SPACES:
        _SPACES.clear()  # one dataset at a time: the space holds large matrices
        _SPACES[key] = SemanticSpace(dm, config, progress)
    return _SPACES[key]
