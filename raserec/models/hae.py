"""GRASP's Holistic Attention Enhancement (HAE), pure torch.

The paper's equations are not public (method note ``../shared/papers/GRASP.md``: every HAE
equation there is a reconstruction, tag [I]); this module implements that reconstruction, with each
unknown as a field of :class:`HAEConfig`:

- adapters ``f_I``, ``f_U``: ``Linear(D, D/2) -> Linear(D/2, d)`` map semantic vectors to width d;
- item contexts ``x_t = f_I(s_t)`` (the item's own text) and ``x~_t = f_I(s~_t)`` (the mean of its
  semantic neighbours), user contexts ``c = f_U(s_u)`` and ``c~ = f_U(s~_u)`` (similar users);
- queries ``q_t = W_Q(e_t + c)``, ``q~_t = W_Q(e_t + c~)`` (``e_t``: the ID embedding), keys and
  values ``W_K x``, ``W_V x``;
- *sigmoid* attention (several items may score high at once; no normalisation across keys),
  causal and padding-masked, then LayerNorm (or division by the number of attended items):
  ``i_self`` (q over x), ``i_sim`` (q~ over x~), ``i_glob`` (the user-only query ``W_Q c`` over x);
- ``x_in_t = MLP([e_t || i_self || i_sim || i_glob])`` (``Linear(4d, d)``, GELU, ``Linear(d, d)``),
  which the backbone reads in place of its item embeddings (``id_residual``: ``e_t + MLP(...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from raserec.errors import ConfigError


@dataclass(frozen=True)
class HAEConfig:
    """The unknowns of GRASP's HAE, as switches (defaults: the note's reconstruction)."""

    score_fn: Literal["sigmoid", "softmax"] = "sigmoid"
    """Attention scores: ``sigmoid`` (GRASP) or ``softmax`` (the paper's ablation)."""
    use_self: bool = True
    """Branch i_self: the sequence's items' own semantics."""
    use_similar: bool = True
    """Branch i_sim: the mean semantics of each item's neighbours, queried with the similar users."""
    use_global: bool = True
    """Branch i_glob: the user-only query over the items' semantics."""
    include_id: bool = True
    """Put the ID embedding e_t into the MLP's input beside the branches."""
    global_causal: bool = True
    """The global branch attends causally too (position t sees items up to t)."""
    norm: Literal["layernorm", "length"] = "layernorm"
    """Scale of the unnormalised sigmoid sums: LayerNorm, or division by the attended count."""
    id_residual: bool = False
    """Add the MLP's output to the ID embedding (``e_t + MLP([...])``) instead of replacing it:
    the ID path reaches the backbone unchanged and HAE learns a correction (the note's appendix
    A.3 view ``W_e e_u + W_c e_c``); off: the note's reconstruction, ``MLP([...])`` alone."""
    adapter_hidden: int | None = None
    """Width of the item and user adapters' middle layer (the note: adapter sizes unknown);
    ``None``: ``max(D / 2, d)``, LLM-ESR's ``Linear(D, D/2) -> Linear(D/2, d)``."""

    def __post_init__(self) -> None:
        if self.score_fn not in ("sigmoid", "softmax"):
            raise ConfigError(f"hae.score_fn must be 'sigmoid' or 'softmax', got {self.score_fn!r}")
        if self.norm not in ("layernorm", "length"):
            raise ConfigError(f"hae.norm must be 'layernorm' or 'length', got {self.norm!r}")
        if not (self.use_self or self.use_similar or self.use_global or self.include_id):
            raise ConfigError("hae: at least one of use_self, use_similar, use_global, include_id must be on")
        if self.adapter_hidden is not None and self.adapter_hidden < 1:
            raise ConfigError(f"hae.adapter_hidden must be >= 1 (or null), got {self.adapter_hidden}")


class Adapter(nn.Sequential):
    """``Linear(D, mid) -> Linear(mid, d)``; ``mid`` defaults to ``max(D/2, d)`` (LLM-ESR's shape)."""

    def __init__(self, semantic_dim: int, hidden_size: int, mid: int | None = None) -> None:
        mid = mid or max(semantic_dim // 2, hidden_size)
        super().__init__(nn.Linear(semantic_dim, mid), nn.Linear(mid, hidden_size))


class HolisticAttention(nn.Module):
    """HAE: ID embeddings plus semantic contexts -> the backbone's input embeddings ``[B, T, d]``.

    Args:
        semantic_dim: D, the semantic vectors' size.
        hidden_size: d, the backbone width.
        config: the switches of :class:`HAEConfig`.
    """

    def __init__(self, semantic_dim: int, hidden_size: int, config: HAEConfig = HAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.item_adapter = Adapter(semantic_dim, hidden_size, config.adapter_hidden)
        self.user_adapter = Adapter(semantic_dim, hidden_size, config.adapter_hidden)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        branches = [config.include_id, config.use_self, config.use_similar, config.use_global]
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(3))
        self.mlp = nn.Sequential(nn.Linear(sum(branches) * hidden_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.scale = 1.0 / math.sqrt(hidden_size)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, norm: nn.Module) -> Tensor:
        scores = (q @ k.transpose(1, 2)) * self.scale  # [B, T(q), T(k)]
        if self.config.score_fn == "sigmoid":
            weights = torch.sigmoid(scores) * mask
        else:
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        out = weights @ v
        if self.config.norm == "length":
            return out / mask.sum(-1, keepdim=True).clamp_min(1)
        return norm(out)

    def item_keys_values(self, table: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, T, d]`` of the items ``ids`` from their semantic rows of ``table``
        ``[N + 1, D]``: ``W_K f_I(s)`` and ``W_V f_I(s)`` are functions of the item alone, so they are
        computed once per distinct item of the batch (a few thousand rows instead of B x T; the
        same values and gradients as per position)."""
        uniq, inverse = torch.unique(ids, return_inverse=True)
        x = self.item_adapter(table[uniq])
        return self.key(x)[inverse], self.value(x)[inverse]

    def forward(self, ids_embedding: Tensor, ids: Tensor, item_table: Tensor, similar_table: Tensor,
                user_semantic: Tensor, similar_user_semantic: Tensor) -> Tensor:
        """``ids_embedding`` ``[B, T, d]`` of the left-padded item ``ids`` ``[B, T]`` (0 = padding);
        ``item_table`` (the items' own semantics) and ``similar_table`` (the mean semantics of each
        item's neighbours) ``[N + 1, D]``; ``user_semantic``, ``similar_user_semantic`` ``[B, D]``.
        Returns ``[B, T, d]``, zero at padding positions."""
        cfg = self.config
        real = ids > 0
        t = real.size(1)
        causal = torch.ones(t, t, dtype=torch.bool, device=real.device).tril()
        mask = causal & real[:, None, :]  # query t sees real items j <= t
        c = self.user_adapter(user_semantic).unsqueeze(1)  # [B, 1, d]
        parts = [ids_embedding] if cfg.include_id else []
        if cfg.use_self or cfg.use_global:
            k, v = self.item_keys_values(item_table, ids)
        if cfg.use_self:
            parts.append(self._attend(self.query(ids_embedding + c), k, v, mask, self.norms[0]))
        if cfg.use_similar:
            c_sim = self.user_adapter(similar_user_semantic).unsqueeze(1)
            k_sim, v_sim = self.item_keys_values(similar_table, ids)
            parts.append(self._attend(self.query(ids_embedding + c_sim), k_sim, v_sim, mask, self.norms[1]))
        if cfg.use_global:
            q_glob = self.query(c).expand(-1, t, -1)
            glob_mask = mask if cfg.global_causal else real[:, None, :].expand(-1, t, -1)
            parts.append(self._attend(q_glob, k, v, glob_mask, self.norms[2]))
        features = torch.cat(parts, dim=-1)
        # The MLP runs on real positions only; padding stays zero, as a padding embedding would be.
        out = features.new_zeros(*real.shape, self.mlp[-1].out_features)
        fused = self.mlp(features[real])
        out[real] = fused + ids_embedding[real] if cfg.id_residual else fused
        return out
