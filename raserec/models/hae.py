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
        Returns ``[B, T, d]``, zero at padding positions.

        Rows attend only within themselves, so they are grouped by length: a row of ``n`` items runs
        at the width of the next power of two (at most ``T``), its left columns being padding, which
        every branch masks. A batch of mostly short rows with one of length ``T`` (the usual case:
        Beauty's prefixes average 8 items) no longer pays ``[B, T, T]`` attention. Same outputs as
        :meth:`dense_forward` up to float summation order (tested). On a GPU the dense path runs:
        the groups' host synchronisations and small kernels are unmeasured there."""
        if ids.is_cuda:
            return self.dense_forward(ids_embedding, ids, item_table, similar_table, user_semantic,
                                      similar_user_semantic)
        cfg = self.config
        t = ids.size(1)
        real = ids > 0
        # From the first real column on (= the length for left padding; a gap inside a row is kept too)
        spans = torch.where(real.any(1), t - real.float().argmax(1), torch.ones_like(ids[:, 0]))
        widths = (2 ** torch.ceil(torch.log2(spans.float()))).long().clamp_max(t)
        # Rows sorted by width, then split (not sliced: backward is one concatenation, where every
        # slice would zero-fill a gradient of the whole batch) into one group per width.
        order = torch.argsort(widths, stable=True)
        group_widths, counts = torch.unique_consecutive(widths[order], return_counts=True)
        sizes = counts.tolist()
        # Keys and values per distinct item of the batch, gathered per group from these [U, d] rows.
        uniq, inverse = torch.unique(ids, return_inverse=True)
        tables = {}
        if cfg.use_self or cfg.use_global:
            x = self.item_adapter(item_table[uniq])
            tables["k"], tables["v"] = self.key(x), self.value(x)
        if cfg.use_similar:
            x = self.item_adapter(similar_table[uniq])
            tables["k_sim"], tables["v_sim"] = self.key(x), self.value(x)
        c = self.user_adapter(user_semantic).index_select(0, order)  # [B, d], sorted
        c_sim = self.user_adapter(similar_user_semantic).index_select(0, order) if cfg.use_similar else None
        groups = zip(group_widths.tolist(), order.split(sizes), ids_embedding.index_select(0, order).split(sizes),
                     inverse.index_select(0, order).split(sizes), c.split(sizes),
                     c_sim.split(sizes) if c_sim is not None else [None] * len(sizes), strict=True)
        features, cells = [], []
        for w, rows, e, inv, c_g, c_sim_g in groups:
            cols = slice(t - w, t)  # the left columns of these rows are padding
            inv = inv[:, cols]
            r = real.index_select(0, rows)[:, cols]
            kv = {name: table[inv] for name, table in tables.items()}
            feats = self._features(e[:, cols], r, kv, c_g, c_sim_g)
            features.append(feats[r])
            cells.append((rows[:, None] * t + torch.arange(t - w, t, device=ids.device))[r])
        return self._fuse(torch.cat(features), torch.cat(cells), ids_embedding)

    def dense_forward(self, ids_embedding: Tensor, ids: Tensor, item_table: Tensor, similar_table: Tensor,
                      user_semantic: Tensor, similar_user_semantic: Tensor) -> Tensor:
        """Reference implementation of :meth:`forward`: every row at the batch's full width."""
        real = ids > 0
        keys = self._keys_values(ids, item_table, similar_table)
        c = self.user_adapter(user_semantic)
        c_sim = self.user_adapter(similar_user_semantic) if self.config.use_similar else None
        feats = self._features(ids_embedding, real, keys, c, c_sim)
        b, t = ids.shape
        return self._fuse(feats[real], torch.arange(b * t, device=ids.device).view(b, t)[real], ids_embedding)

    def _keys_values(self, ids: Tensor, item_table: Tensor, similar_table: Tensor) -> dict[str, Tensor]:
        """Keys and values ``[B, T, d]`` of every branch in use (once per batch, not per length group)."""
        cfg, out = self.config, {}
        if cfg.use_self or cfg.use_global:
            out["k"], out["v"] = self.item_keys_values(item_table, ids)
        if cfg.use_similar:
            out["k_sim"], out["v_sim"] = self.item_keys_values(similar_table, ids)
        return out

    def _features(self, e: Tensor, real: Tensor, kv: dict[str, Tensor], c: Tensor, c_sim: Tensor | None) -> Tensor:
        """``[e_t || i_self || i_sim || i_glob]`` ``[B, T, F]`` of rows ``e`` ``[B, T, d]`` (padding
        positions hold values the caller drops)."""
        cfg = self.config
        t = real.size(1)
        causal = torch.ones(t, t, dtype=torch.bool, device=real.device).tril()
        mask = causal & real[:, None, :]  # query t sees real items j <= t
        c = c.unsqueeze(1)  # [B, 1, d]
        parts = [e] if cfg.include_id else []
        if cfg.use_self:
            parts.append(self._attend(self.query(e + c), kv["k"], kv["v"], mask, self.norms[0]))
        if cfg.use_similar:
            parts.append(self._attend(self.query(e + c_sim.unsqueeze(1)), kv["k_sim"], kv["v_sim"], mask,
                                      self.norms[1]))
        if cfg.use_global:
            q_glob = self.query(c).expand(-1, t, -1)
            glob_mask = mask if cfg.global_causal else real[:, None, :].expand(-1, t, -1)
            parts.append(self._attend(q_glob, kv["k"], kv["v"], glob_mask, self.norms[2]))
        return torch.cat(parts, dim=-1)

    def _fuse(self, features: Tensor, cells: Tensor, ids_embedding: Tensor) -> Tensor:
        """The MLP over the real positions' features ``[R, F]`` (flat indices ``cells`` of
        ``[B, T]``), scattered into ``[B, T, d]``; padding stays zero, as a padding embedding would be."""
        b, t, d = ids_embedding.shape
        fused = self.mlp(features)
        if self.config.id_residual:
            fused = fused + ids_embedding.reshape(b * t, d).index_select(0, cells)
        out = fused.new_zeros(b * t, fused.size(1)).index_copy(0, cells, fused)
        return out.view(b, t, -1)

