"""GRU4Rec (Hidasi et al., 2016) as RecBole configures it: item embedding -> dropout -> GRU ->
linear projection back to the embedding size, read at the last real position.

Sequences arrive left-padded. Instead of relying on zero padding embeddings to leave the GRU
state untouched (true only without biases and with zero inputs, which an ``item_embeddings``
override need not give), the real items are right-aligned and packed, so the GRU never sees a
padding step and its final state is exactly the state after each sequence's most recent item.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from raserec.errors import check_sizes
from raserec.models.encoders.base import SequenceEncoder
from raserec.models.layers import FastDropout


def right_align(x: Tensor, lengths: Tensor) -> Tensor:
    """Move each row's last ``lengths[b]`` entries (of a left-padded ``[B, T, ...]`` tensor) to
    the front; what follows them is arbitrary (packing ignores it)."""
    t = x.size(1)
    idx = (torch.arange(t, device=x.device).unsqueeze(0) + (t - lengths).unsqueeze(1)).clamp_max(t - 1)
    if x.dim() == 3:
        idx = idx.unsqueeze(-1).expand(-1, -1, x.size(-1))
    return x.gather(1, idx)


class GRU4Rec(SequenceEncoder):
    """Recurrent sequential recommendation encoder (RecBole layout).

    Args:
        num_items: number of real items (the table has ``num_items + 1`` rows; row 0 = padding).
        hidden_size: embedding size d, which is also the size of the user representation.
        gru_size: size of the GRU state (RecBole's ``hidden_size``); projected back to d.
        num_layers: stacked GRU layers.
        dropout: dropout on the input item embeddings.
        max_len: longest input the data gives (the GRU itself has no length limit).
        bias: GRU biases (RecBole uses none).
    """

    def __init__(
        self,
        num_items: int,
        hidden_size: int = 64,
        gru_size: int = 128,
        num_layers: int = 1,
        dropout: float = 0.5,
        max_len: int = 50,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.record_init_args(locals())
        check_sizes(num_items=num_items, hidden_size=hidden_size, max_len=max_len, num_layers=num_layers)
        self.hidden_size = hidden_size
        self.max_len = max_len
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
        self.input_dropout = FastDropout(dropout)
        self.gru = nn.GRU(hidden_size, gru_size, num_layers=num_layers, bias=bias, batch_first=True)
        self.dense = nn.Linear(gru_size, hidden_size)
        self._init_weights()

    def _init_weights(self) -> None:
        # RecBole: Xavier-normal embeddings, Xavier-uniform GRU weights; the padding row is never read.
        nn.init.xavier_normal_(self.item_embedding.weight)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        for name, param in self.gru.named_parameters():
            if name.startswith("weight"):
                nn.init.xavier_uniform_(param)
            else:
                nn.init.zeros_(param)

    def forward(self, input_ids: Tensor, item_embeddings: Tensor | None = None) -> Tensor:
        """User representation ``[B, d]``: the projected GRU state after the most recent item.
        ``item_embeddings`` (``[B, T, d]``) optionally replaces the table lookup of ``input_ids``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        lengths = (input_ids > 0).sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("empty input sequence (all padding) in the batch")
        t = int(lengths.max())  # drop columns that are padding in every row
        lengths_cpu = lengths.cpu()  # pack_padded_sequence wants lengths on the CPU
        if item_embeddings is None:
            emb = self.item_embedding(right_align(input_ids[:, -t:], lengths))
        else:
            emb = right_align(item_embeddings[:, -t:], lengths)
        packed = pack_padded_sequence(self.input_dropout(emb), lengths_cpu, batch_first=True, enforce_sorted=False)
        _, h_n = self.gru(packed)  # [num_layers, B, gru_size], back in batch order
        return self.dense(h_n[-1])
