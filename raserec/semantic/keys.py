"""RaSeRec with memory keys that mix collaborative and semantic similarity (no paper has it).

RaSeRec retrieves the memories whose frozen-encoder representation h is closest to the query's
(collaborative similarity); SRA-CL and GRASP retrieve by the similarity of text embeddings. Here
the memory bank is searched by the key

    key = [ sqrt(1 - w) * h / |h| ;  sqrt(w) * s ]

where ``s`` is the prefix's semantic vector (the normalised sum of the text vectors of its last
``semantic.prefix_window`` items: the ``mean_items`` vector of GRASP and of our SRA-CL). Both
halves are unit vectors, so the inner product of two keys, the bank's similarity, is

    (1 - w) cos(h, h') + w cos(s, s')

``w = 0`` is RaSeRec's own retrieval, ``w = 1`` purely semantic retrieval. Only *which* memories
are retrieved changes: their payload (h_k and the target embedding v_k), the leakage rule and the
RAM are RaSeRec's. A prefix none of whose items has text has ``s = 0`` and is retrieved by h
alone (the bank normalises keys, so its key becomes h / |h|).

The key function is injected into the retrieval component
(:class:`raserec.memory.retriever.MemoryRetriever`), so the bank, its precomputed training
memories, its rebuilds and its staleness checks work unchanged.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from raserec.errors import ConfigError, check
from raserec.finetune.module import RAFTModule
from raserec.semantic.space import SemanticConfig, mean_item_vectors, semantic_space, trainer_datamodule
from raserec.typed_config import coerce_config


class SemanticKeys:
    """Search keys ``[sqrt(1 - w) h/|h| ; sqrt(w) s]`` from h and the items of a sequence.

    Args:
        item_vectors: ``[N + 1, D]`` normalised item text vectors (row 0 and text-less items zero).
        weight: w, the share of semantic similarity in the retrieval score, in [0, 1].
        window: most recent items of a sequence averaged into ``s``.
        label: how the text vectors were made (recorded in the fingerprint).
    """

    def __init__(self, item_vectors: Tensor, weight: float, window: int, label: str = "") -> None:
        check(0.0 <= weight <= 1.0, f"semantic_weight must lie in [0, 1], got {weight}")
        check(window >= 1, f"window must be >= 1, got {window}")
        self.item_vectors = item_vectors.float()
        self.weight = float(weight)
        self.window = int(window)
        digest = hashlib.sha256(self.item_vectors.numpy().tobytes()).hexdigest()[:16]
        #: Names the function in the bank's manifest: a bank built with other vectors or another
        #: weight is never reused.
        self.fingerprint = f"semantic-keys(w={self.weight:g},window={self.window},{label},{digest})"

    def __call__(self, h: Tensor, input_ids: Tensor) -> Tensor:
        s = mean_item_vectors(self.item_vectors.to(h.device), input_ids, self.window)
        return torch.cat([math.sqrt(1.0 - self.weight) * F.normalize(h.float(), dim=-1),
                          math.sqrt(self.weight) * s], dim=-1)


class SemanticKeysRAFTModule(RAFTModule):
    """RAFT whose memory bank is searched by :class:`SemanticKeys` (see the module docstring).

    Every other argument is :class:`~raserec.finetune.module.RAFTModule`'s.

    Args:
        semantic: where the item text vectors come from (``prefix_vectors`` must be
            ``mean_items``: the keys are computed from the sequence's items).
        semantic_weight: w, the share of semantic similarity in the retrieval score (0 = RaSeRec).
    """

    def __init__(self, *args: Any, semantic: SemanticConfig = SemanticConfig(prefix_vectors="mean_items"),
                 semantic_weight: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        semantic = coerce_config(SemanticConfig, semantic)
        if semantic.prefix_vectors != "mean_items":
            raise ConfigError("semantic keys are computed from the sequence's items: semantic.prefix_vectors must be "
                              "'mean_items'")
        check(0.0 <= semantic_weight <= 1.0, f"semantic_weight must lie in [0, 1], got {semantic_weight}")
        self.semantic = semantic
        self.semantic_weight = float(semantic_weight)
        self.hparams["semantic"] = asdict(semantic)  # plain data in the checkpoint

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.attach(trainer_datamodule(self, "semantic memory keys"))

    def attach(self, dm) -> None:
        """Give the retriever the key function of ``dm``'s item text (before the bank is built)."""
        space = semantic_space(dm, self.semantic)
        keys = SemanticKeys(torch.from_numpy(space.item_vectors), self.semantic_weight, self.semantic.prefix_window,
                            self.semantic.label())
        if self.retriever.key_fn is None or self.retriever.key_fn.fingerprint != keys.fingerprint:
            self.retriever.key_fn = keys


__all__ = ["SemanticKeys", "SemanticKeysRAFTModule"]
