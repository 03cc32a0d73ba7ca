"""SASRec (Kang and McAuley, 2018) as the RaSeRec authors configure it (RecBole layout).

The forward pass is *packed*: per-token layers (projections, feed-forward, LayerNorm, dropout)
run only on real tokens of the batch's rows sorted by length, attention runs per bucket of
consecutive lengths (a view of the tokens when the bucket holds one length, else a grid only as
wide as its longest row), and the last block computes queries only at the last position, the only
output the model reads. Padding tokens never influence real ones (their keys are masked),
so this gives the same representation as the dense computation in :meth:`SASRec.dense_forward`
(a test checks it) at a fraction of the cost on short sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from raserec.models.encoders.transformer import TransformerEncoder
from raserec.models.layers import PackedLayout


class SASRec(TransformerEncoder):
    """Self-attentive sequential recommendation encoder: causal attention, read at the most
    recent position. Arguments: :class:`~raserec.models.encoders.transformer.TransformerEncoder`'s.
    """

    def _prepare(self, input_ids: Tensor, with_mask: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        positions = self.positions(input_ids)
        real = input_ids > 0
        if not with_mask:
            return positions, real, None
        t = input_ids.size(1)
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        mask = (causal & real[:, None, :]).unsqueeze(1)  # [B, 1, T, T]
        return positions, real, mask

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """All positions' hidden states ``[B, T, d]`` (dense; padding rows are meaningless)."""
        positions, _, mask = self._prepare(input_ids)
        x = self.embed(self.item_embedding(input_ids), positions)
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
        layout = PackedLayout.build(input_ids)
        b, t = input_ids.shape
        if not layout.sorted_rows:  # rows sorted by length: each bucket's tokens are one run
            input_ids = input_ids.index_select(0, layout.order)
        positions, real, _ = self._prepare(input_ids, with_mask=False)
        flat_real = real.reshape(-1)
        pos = positions.repeat(b)[flat_real]
        if item_embeddings is None:
            emb = self.item_embedding(input_ids.reshape(-1)[flat_real])
        else:  # gather only the real cells, in sorted order: cell (r, c) is row order[r]'s column c
            cells = layout.order.unsqueeze(1) * t + torch.arange(t, device=input_ids.device)
            emb = item_embeddings.reshape(b * t, -1).index_select(0, cells.reshape(-1)[flat_real])
        x = self.embed(emb, pos)
        for i, block in enumerate(self.blocks):
            x = block.forward_packed(x, layout, last_only=i == len(self.blocks) - 1)
        return x if layout.sorted_rows else x.index_select(0, layout.inverse)
