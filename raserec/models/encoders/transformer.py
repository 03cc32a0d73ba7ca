"""The Transformer trunk SASRec and BERT4Rec share (RecBole layout): an item table, learnable
positions aligned by recency, input LayerNorm + dropout, and a stack of self-attention blocks.
The subclasses differ only in the attention pattern (causal or bidirectional) and in where the
user representation is read."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from raserec.errors import check_sizes
from raserec.models.encoders.base import SequenceEncoder
from raserec.models.layers import FastDropout, SelfAttentionBlock, init_weights


class TransformerEncoder(SequenceEncoder):
    """Shared construction and input embedding of the self-attentive encoders.

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
        self.init_std = init_std
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.input_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.input_dropout = FastDropout(dropout)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(hidden_size, num_heads, inner_size, dropout, attn_dropout, layer_norm_eps)
            for _ in range(num_layers)
        )
        self.apply(partial(init_weights, std=init_std))

    def positions(self, input_ids: Tensor) -> Tensor:
        """Position ids of a left-padded ``[B, T]`` batch, checked against ``max_len``. Aligned by
        recency: the most recent slot is always position ``max_len - 1``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        t = input_ids.size(1)
        if t > self.max_len:
            raise ValueError(f"input length {t} exceeds max_len {self.max_len}")
        return torch.arange(self.max_len - t, self.max_len, device=input_ids.device)

    def embed(self, item_emb: Tensor, positions: Tensor) -> Tensor:
        """The first block's input: dropout(LayerNorm(item embedding + position embedding))."""
        return self.input_dropout(self.input_norm(item_emb + self.position_embedding(positions)))
