"""Ada-Retrieval (Li et al., AAAI 2024) around any :class:`SequenceEncoder` (pure torch).

One top-K retrieval becomes T rounds of top-k (k = K // T). Round t re-encodes the history
with IRA-adapted item embeddings (context: the items rounds 1..t-1 retrieved), passes the
encoder's output through URA (context: the adapted representations of rounds 1..t-1), and
retrieves the k best items not retrieved before. Round 1 has no context, so it is exactly the
backbone. The final list is the rounds' blocks concatenated in order (not re-sorted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from raserec.errors import ConfigError
from raserec.models.ada_adapters import ItemRepresentationAdapter, UserRepresentationAdapter
from raserec.models.encoders.base import SequenceEncoder


class AdaOutput(NamedTuple):
    """What one multi-round pass returns."""

    user_reprs: Tensor  # [B, T, d]: adapted u_t per round (round 1 = the backbone's output)
    retrieved: Tensor  # [B, T, k]: item ids (1..N) each round retrieved, best first within a round
    scores: list[Tensor]  # per round [B, N] raw scores u_t . V^T (with grad); empty unless requested

    def final_list(self) -> Tensor:
        """The recommendation list ``[B, T * k]``: the rounds' blocks in round order."""
        return self.retrieved.flatten(1)


def items_mask(item_ids: Tensor, num_items: int) -> Tensor:
    """Boolean ``[B, N]`` mask (column ``j`` = item ``j + 1``) of the ids in ``item_ids``
    ``[B, L]`` (0 = padding, ignored)."""
    mask = torch.zeros(item_ids.size(0), num_items + 1, dtype=torch.bool, device=item_ids.device)
    return mask.scatter_(1, item_ids, True)[:, 1:]


def list_ranks(lists: Tensor, target: Tensor) -> Tensor:
    """0-based position of each target in its list ``[B, M]`` of item ids, or ``M`` when absent
    (any rank >= the largest cut-off counts as a miss)."""
    hit = lists == target.unsqueeze(1)
    first = hit.to(torch.int8).argmax(1)  # first True (lists hold distinct items anyway)
    return torch.where(hit.any(1), first, torch.full_like(first, lists.size(1)))


class AdaRetrieval(nn.Module):
    """Multi-round retrieval with item and user representation adapters around ``encoder``.

    Args:
        encoder: the backbone (owns the item table, which is also the output layer).
        rounds: number of rounds T.
        total_k: length K of the final list; each round retrieves k = K // T items.
        dropout: dropout of the adapters.
        filter_per_round: one IRA filter layer per earlier round's block (``False``: one shared
            filter layer, as in the authors' code).
        layer_norm_eps: LayerNorm epsilon of the adapters.
        init_std: standard deviation of the adapters' normal initialisation.
        item_bias: score ``u . v_i + b_i`` with a learned per-item bias initialised N(0, 0.1), as
            the authors' code does (``False``: plain dot products, the backbone's own scores).
    """

    def __init__(self, encoder: SequenceEncoder, rounds: int = 5, total_k: int = 100, dropout: float = 0.2,
                 filter_per_round: bool = False, layer_norm_eps: float = 1e-12, init_std: float = 0.02,
                 item_bias: bool = False) -> None:
        super().__init__()
        if rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {rounds}")
        if total_k < rounds:
            raise ConfigError(f"total_k ({total_k}) must be >= rounds ({rounds}): each round retrieves k = K // T items")
        self.encoder = encoder
        self.rounds = rounds
        self.k = total_k // rounds
        d = encoder.hidden_size
        self.ira = ItemRepresentationAdapter(d, self.k, rounds - 1, dropout, filter_per_round, layer_norm_eps,
                                             init_std)
        self.ura = UserRepresentationAdapter(d, dropout, layer_norm_eps, init_std)
        num_items = encoder.item_embedding.num_embeddings - 1
        self.item_bias = nn.Parameter(torch.randn(num_items) * 0.1) if item_bias else None

    def score(self, u: Tensor, weights: Tensor) -> Tensor:
        """Scores ``[B, N]`` of the representations ``u`` ``[B, d]`` against item rows ``[N, d]``."""
        s = u @ weights.T
        return s if self.item_bias is None else s + self.item_bias

    def score_items(self, u: Tensor, item_ids: Tensor) -> Tensor:
        """Scores of chosen items: ``u`` ``[B, T, d]``, ``item_ids`` ``[B, C]`` -> ``[B, T, C]``."""
        s = torch.einsum("btd,bcd->btc", u, self.encoder.item_embedding(item_ids))
        return s if self.item_bias is None else s + self.item_bias[item_ids - 1].unsqueeze(1)

    @property
    def list_length(self) -> int:
        """Length of the final list, ``T * k`` (``<= total_k``)."""
        return self.rounds * self.k

    def forward(self, input_ids: Tensor, exclude: Tensor | None = None, return_scores: bool = False,
                augment: Callable[[Tensor], Tensor] | None = None) -> AdaOutput:
        """Run the T rounds.

        Args:
            input_ids: left-padded history ``[B, L]`` (0 = padding, most recent last).
            exclude: optional item ids ``[B, M]`` no round may retrieve (e.g. the history;
                0 = none). Items retrieved in earlier rounds are always excluded from later ones.
            return_scores: also return each round's raw scores ``[B, N]`` with gradients (for a
                full-softmax loss); otherwise retrieval scores are computed without autograd.
            augment: optional map applied to every round's user representation before it
                retrieves (RaSeRec + Ada-Retrieval: RAM with memories from a memory bank).
        """
        encoder = self.encoder
        weights = encoder.item_weights()  # [N, d], column j = item j + 1
        n = weights.size(0)
        if self.list_length > n:
            raise ValueError(f"{self.rounds} rounds x {self.k} items exceed the {n} items")
        excluded_at = None
        if exclude is not None:
            # Exclusions are written into each round's scores at these positions only: O(B * M)
            # per round, where a [B, N] boolean mask would cost a pass over all scores.
            keep = exclude > 0
            rows = torch.arange(exclude.size(0), device=exclude.device).unsqueeze(1).expand_as(exclude)
            excluded_at = (rows[keep], exclude[keep] - 1)
            # Fewer free items than the list needs would make top-k return excluded (-inf) ones.
            if n - exclude.size(1) < self.list_length and int(
                    (~items_mask(exclude, n)).sum(1).min()) < self.list_length:
                raise ValueError(f"a row excludes so many items that fewer than {self.list_length} are left")
        history = real = None
        users: list[Tensor] = []
        retrieved: list[Tensor] = []
        blocks: list[Tensor] = []
        branches: list[Tensor] = []  # each block's deterministic filter branch, computed once
        scores: list[Tensor] = []
        for t in range(self.rounds):
            if t == 0:
                u = encoder(input_ids)  # no context: IRA and URA are the identity, skip them
            else:
                if history is None:
                    history, real = encoder.item_embedding(input_ids), input_ids > 0
                branches.append(self.ira.filter_for(t - 1).branch(blocks[t - 1]))
                u = encoder(input_ids, item_embeddings=self.ira(history, blocks, real, branches))
                u = self.ura(u, torch.stack(users, dim=1))
            if augment is not None:
                u = augment(u)
            users.append(u)
            if return_scores:
                s = self.score(u, weights)
                scores.append(s)
                s = s.detach().clone()  # the loss needs the raw scores: mask a copy
            else:
                with torch.no_grad():
                    s = self.score(u, weights)
            # Top-k is not differentiable: gradients reach the context only through the
            # embeddings of the retrieved items (and through the earlier rounds' u).
            if excluded_at is not None:
                s.index_put_(excluded_at, s.new_tensor(float("-inf")))
            if retrieved:
                s.scatter_(1, torch.cat(retrieved, dim=1) - 1, float("-inf"))
            ids = s.topk(self.k, dim=1).indices + 1  # [B, k] item ids, best first
            retrieved.append(ids)
            if t < self.rounds - 1:
                blocks.append(encoder.item_embedding(ids))
        return AdaOutput(torch.stack(users, dim=1), torch.stack(retrieved, dim=1), scores)
