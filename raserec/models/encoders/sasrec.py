"""SASRec (Kang and McAuley, 2018) as the RaSeRec authors configure it (RecBole layout).

The forward pass is *packed*: per-token layers (projections, feed-forward, LayerNorm, dropout)
run only on real tokens, attention runs per length bucket on grids only as wide as the bucket's
longest sequence, and the last block computes queries only at the last position, the only
output the model reads. Padding tokens never influence real ones (their keys are masked),
so this gives the same representation as the dense computation in :meth:`SASRec.dense_forward`
(a test checks it) at a fraction of the cost on short sequences.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from raserec.errors import check_sizes
from raserec.models.encoders.base import SequenceEncoder
from raserec.models.layers import FastDropout, PackedLayout, SelfAttentionBlock, init_weights


class SASRec(SequenceEncoder):
    """Self-attentive sequential recommendation encoder.

    Args:
        num_items: number of real items (the table has ``num_items + 1`` rows; row 0 = padding).
        hidden_size: embedding and hidden size d.
        max_len: maximum input length T (learnable positions).
        num_layers: Transformer blocks.
        num_heads: attention heads per block.
        inner_size: feed-forward inner size.
        dropout: dropout on the input embeddings and hidden states.
        attn_dropout: dropout on the attention probabilities.
        layer_norm_eps: LayerNorm epsilon.
        init_std: standard deviation of the normal initialisation.
    """

    def __init__(
        self,
        num_items: int,
        hidden_size: int = 64,
        max_len: int = 50,
        num_layers: int = 2,
        num_heads: int = 2,
        inner_size: int = 256,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        layer_norm_eps: float = 1e-12,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.record_init_args(locals())
        check_sizes(num_items=num_items, hidden_size=hidden_size, max_len=max_len, num_layers=num_layers,
                    num_heads=num_heads, inner_size=inner_size)
        self.hidden_size = hidden_size
        self.max_len = max_len
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.input_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.input_dropout = FastDropout(dropout)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(hidden_size, num_heads, inner_size, dropout, attn_dropout, layer_norm_eps)
            for _ in range(num_layers)
        )
        self.apply(partial(init_weights, std=init_std))

    def _prepare(self, input_ids: Tensor, with_mask: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        t = input_ids.size(1)
        if t > self.max_len:
            raise ValueError(f"input length {t} exceeds max_len {self.max_len}")
        # Left padding aligns positions by recency: the last item always has position max_len - 1.
        positions = torch.arange(self.max_len - t, self.max_len, device=input_ids.device)
        real = input_ids > 0
        if not with_mask:
            return positions, real, None
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        mask = (causal & real[:, None, :]).unsqueeze(1)  # [B, 1, T, T]
        return positions, real, mask

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """All positions' hidden states ``[B, T, d]`` (dense; padding rows are meaningless)."""
        positions, _, mask = self._prepare(input_ids)
        x = self.input_dropout(self.input_norm(self.item_embedding(input_ids) + self.position_embedding(positions)))
        for block in self.blocks:
            x = block(x, mask)
        return x

    def dense_forward(self, input_ids: Tensor) -> Tensor:
        """Reference implementation of :meth:`forward` without packing."""
        return self.hidden_states(input_ids)[:, -1]

    def forward(self, input_ids: Tensor, item_embeddings: Tensor | None = None) -> Tensor:
        """User representation ``[B, d]``. ``item_embeddings`` (``[B, T, d]``) optionally replaces
        the table lookup of ``input_ids`` (adapters such as Ada-Retrieval's IRA transform the
        history embeddings before positions and LayerNorm); ``input_ids`` still gives the mask."""
        positions, real, _ = self._prepare(input_ids, with_mask=False)
        layout = PackedLayout.build(input_ids)
        flat_real = real.reshape(-1)
        pos = positions.repeat(input_ids.size(0))[flat_real]
        if item_embeddings is None:
            emb = self.item_embedding(input_ids.reshape(-1)[flat_real])
        else:
            emb = item_embeddings.reshape(-1, item_embeddings.size(-1))[flat_real]
        x = self.input_dropout(self.input_norm(emb + self.position_embedding(pos)))
        for i, block in enumerate(self.blocks):
            x = block.forward_packed(x, layout, last_only=i == len(self.blocks) - 1)
        return x
