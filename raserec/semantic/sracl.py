"""SRA-CL (Cui et al., NeurIPS 2025): semantic-retrieval-augmented contrastive learning, as two
pre-training objectives on any backbone (method note: ``../shared/papers/SRA-CL.md``).

- :class:`SRACLIntraUser` (L_IS): two views of a sequence in which every real item is replaced,
  with probability ``substitution``, by a uniformly drawn semantic neighbour; NT-Xent between them.
- :class:`SRACLInterUser` (L_CS): the user's positive is a learnable weighted sum of the backbone
  encodings of its ``k`` semantically nearest training prefixes (the *sample synthesiser*:
  attention over projected semantic vectors, softmax, dropout 0.5 in training as in the official
  code); NT-Xent between the user and that synthesised positive. Gradients flow through the
  neighbours' encodings (official code).

Total loss, as in the paper: CE + alpha L_CS + beta L_IS (``weight`` of each objective, 0.1 both).
NT-Xent is the official form: raw dot products, tau = 1, the other 2N - 2 rows as negatives
(:func:`raserec.models.losses.info_nce`).

Deviations, all recorded: neighbour texts come from training prefixes only (never a validation or
test target; the official code used every prefix); a prefix's neighbours never include its user's
longer prefixes (they contain its target; the official code excluded only the prefix itself) and by
default not its shorter ones either (``semantic.exclude_same_user``); text-less items and padding
are never substituted or substitutes; ``neighbours_used`` can encode fewer than ``k`` neighbours
per step (a CPU budget option; default all ``k``). The configs' prefix vectors are the mean of
their items' vectors (``prefix_vectors: mean_items``; the official code embeds an LLM summary of
each prefix); max_len is 50 like every other row (official: 20); early stopping watches val HR@10
(official: MRR@10); L_CS's anchor is the pass the CE reads (official: a separate dropout pass).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raserec.data.batch import PretrainBatch
from raserec.errors import check
from raserec.models.encoders.base import SequenceEncoder
from raserec.models.losses import info_nce
from raserec.pretrain.objectives import Objective
from raserec.semantic.space import SemanticConfig, semantic_space
from raserec.typed_config import coerce_config

if TYPE_CHECKING:
    from raserec.data.datamodule import SequenceDataModule


def substitute(input_ids: Tensor, neighbours: Tensor, probability: float,
               generator: torch.Generator | None = None) -> Tensor:
    """``input_ids`` with each real item replaced, independently with ``probability``, by one of
    its neighbours (``neighbours[item]``, ``[N + 1, k]``, 0 = none) drawn uniformly among those it
    has. Padding (0) and items without neighbours are never touched."""
    counts = (neighbours > 0).sum(1)  # neighbours are stored best first, zeros at the end
    have = counts[input_ids]
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    replace = (input_ids > 0) & (have > 0) & (draw < probability)
    pick = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    column = (pick * have).long().clamp_max(neighbours.size(1) - 1)
    return torch.where(replace, neighbours[input_ids, column], input_ids)


class Synthesiser(nn.Module):
    """SRA-CL's learnable sample synthesiser: weights over a user's ``k`` neighbours from
    ``e = LeakyReLU_0.2(a^T [z_u || z_u'])`` with ``z = W s`` (``s``: semantic vectors), a softmax
    over the real neighbours, then dropout on the weights (official code: 0.5; kept weights are
    scaled by 1 / (1 - p), so in training they sum to 1 only in expectation; in eval mode exactly).

    Args:
        semantic_dim: D, the size of the semantic vectors.
        hidden_size: d, the backbone width (size of ``z``).
        dropout: dropout on the weights in training.
    """

    def __init__(self, semantic_dim: int, hidden_size: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.project = nn.Parameter(torch.empty(semantic_dim, hidden_size))
        self.attention = nn.Parameter(torch.empty(2 * hidden_size, 1))
        nn.init.xavier_uniform_(self.project, gain=1.414)
        nn.init.xavier_uniform_(self.attention, gain=1.414)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, neighbours: Tensor, valid: Tensor) -> Tensor:
        """Weights ``[B, k]`` from query vectors ``[B, D]``, neighbour vectors ``[B, k, D]`` and
        the mask of real neighbours ``[B, k]`` (rows without any get all-zero weights)."""
        z_u = query @ self.project  # [B, d]
        z_n = neighbours @ self.project  # [B, k, d]
        d = z_u.size(-1)
        a_u, a_n = self.attention[:d, 0], self.attention[d:, 0]
        scores = F.leaky_relu((z_u @ a_u).unsqueeze(1) + z_n @ a_n, 0.2)
        scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # a row with no neighbour: zeros
        return self.dropout(weights)


class _Semantic(Objective):
    """Shared plumbing: the semantic config, and the space built from the datamodule at setup."""

    def __init__(self, weight: float, semantic: SemanticConfig | dict[str, Any] | None) -> None:
        super().__init__(weight)
        self.semantic = coerce_config(SemanticConfig, semantic)
        self.space = None

    def setup(self, datamodule: SequenceDataModule) -> None:
        self.space = semantic_space(datamodule, self.semantic)

    def _ready(self):
        if self.space is None:
            raise RuntimeError(f"{type(self).__name__} was not set up with the datamodule (PretrainModule.setup)")
        return self.space


class SRACLIntraUser(_Semantic):
    """L_IS: NT-Xent between two neighbour-substituted views of the sequence.

    Args:
        weight: beta, the weight of L_IS.
        semantic: where item semantics come from (item neighbours: ``semantic.k``).
        substitution: per-item substitution probability (paper: 0.2).
        temperature: NT-Xent temperature (official: 1.0, dot products).
    """

    name = "loss_is"

    def __init__(self, weight: float = 0.1, semantic: SemanticConfig | dict[str, Any] | None = None,
                 substitution: float = 0.2, temperature: float = 1.0) -> None:
        super().__init__(weight, semantic)
        check(0.0 <= substitution <= 1.0, f"substitution must be in [0, 1], got {substitution}")
        check(temperature > 0, f"temperature must be > 0, got {temperature}")
        self.substitution = float(substitution)
        self.temperature = float(temperature)
        self._neighbours: Tensor | None = None

    def init_args(self) -> dict[str, Any]:
        return {"weight": self.weight, "semantic": asdict(self.semantic), "substitution": self.substitution,
                "temperature": self.temperature}

    def setup(self, datamodule: SequenceDataModule) -> None:
        super().setup(datamodule)
        self._neighbours = torch.from_numpy(self._ready().item_neighbours.astype(np.int64))

    def views(self, batch: PretrainBatch) -> dict[str, Tensor]:
        self._ready()
        assert self._neighbours is not None
        ids = batch["input_ids"]
        table = self._neighbours.to(ids.device)
        return {"substituted_a": substitute(ids, table, self.substitution),
                "substituted_b": substitute(ids, table, self.substitution)}

    def loss(self, encoder: SequenceEncoder, batch: PretrainBatch, reprs: dict[str, Tensor]) -> Tensor:
        return info_nce(reprs["substituted_a"], reprs["substituted_b"], self.temperature, "dot")


class SRACLInterUser(_Semantic):
    """L_CS: NT-Xent between the sequence (the ``sequence`` view that the CE also reads) and a
    positive synthesised from its semantically nearest training prefixes.

    Args:
        weight: alpha, the weight of L_CS.
        semantic: where prefix semantics come from (``semantic.k`` neighbours per prefix).
        temperature: NT-Xent temperature (official: 1.0, dot products).
        synthesiser_dropout: dropout on the synthesiser's weights (official: 0.5).
        neighbours_used: encode only the first (nearest) this many of the ``k`` neighbours per step
            (``null``: all ``k``, the paper); fewer costs less CPU.
    """

    name = "loss_cs"

    def __init__(self, weight: float = 0.1, semantic: SemanticConfig | dict[str, Any] | None = None,
                 temperature: float = 1.0, synthesiser_dropout: float = 0.5,
                 neighbours_used: int | None = None) -> None:
        super().__init__(weight, semantic)
        check(temperature > 0, f"temperature must be > 0, got {temperature}")
        check(0.0 <= synthesiser_dropout < 1.0, f"synthesiser_dropout must be in [0, 1), got {synthesiser_dropout}")
        check(neighbours_used is None or 1 <= neighbours_used <= self.semantic.k,
              f"neighbours_used must be in [1, semantic.k={self.semantic.k}], got {neighbours_used}")
        self.temperature = float(temperature)
        self.synthesiser_dropout = float(synthesiser_dropout)
        self.neighbours_used = neighbours_used
        self.synthesiser: Synthesiser | None = None
        self._rows = self._vectors = None
        self._dataset = None

    def init_args(self) -> dict[str, Any]:
        return {"weight": self.weight, "semantic": asdict(self.semantic), "temperature": self.temperature,
                "synthesiser_dropout": self.synthesiser_dropout, "neighbours_used": self.neighbours_used}

    def build(self, encoder: SequenceEncoder) -> nn.Module:
        from raserec.semantic.embedders import EMBEDDERS

        dim = EMBEDDERS[self.semantic.embedder]().dim
        self.synthesiser = Synthesiser(dim, encoder.hidden_size, self.synthesiser_dropout)
        return self.synthesiser

    def setup(self, datamodule: SequenceDataModule) -> None:
        super().setup(datamodule)
        space = self._ready()
        used = self.neighbours_used or self.semantic.k
        self._rows = torch.from_numpy(space.prefix_neighbours[:, :used].astype(np.int64))
        self._vectors = torch.from_numpy(space.prefix_vectors)
        self._dataset = datamodule.dataset("train")

    def views(self, batch: PretrainBatch) -> dict[str, Tensor]:
        self._ready()
        assert self._rows is not None and self._dataset is not None
        rows = self._rows[batch["index"].cpu()]
        ids = self._dataset.prefixes(rows.clamp_min(0).reshape(-1)).to(batch["input_ids"].device)
        return {"sequence": batch["input_ids"], "semantic_neighbours": ids}

    def loss(self, encoder: SequenceEncoder, batch: PretrainBatch, reprs: dict[str, Tensor]) -> Tensor:
        assert self.synthesiser is not None and self._rows is not None and self._vectors is not None
        index = batch["index"].cpu()
        rows = self._rows[index]
        h = reprs["sequence"]
        b, k = rows.shape
        neighbours = reprs["semantic_neighbours"].view(b, k, -1)
        device = h.device
        valid = (rows >= 0).to(device)
        weights = self.synthesiser(self._vectors[index].to(device), self._vectors[rows.clamp_min(0)].to(device),
                                   valid)
        positive = (weights.unsqueeze(-1) * neighbours).sum(1)
        keep = valid.any(1)
        return info_nce(h[keep], positive[keep], self.temperature, "dot")
