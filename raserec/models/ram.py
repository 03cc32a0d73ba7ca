"""RAM, the retrieval-augmented module of RaSeRec (paper Eq. 9-11).

Two channels of multi-head cross-attention with the user representation h as the query:
    channel 1: keys = retrieved h_k, values = retrieved target embeddings v_k
    channel 2: keys = v_k, values = h_k
    h~ = alpha * h + (1 - alpha) * (beta * c1 + (1 - beta) * c2)
Each channel stacks ``depth`` cross-attention layers with a feed-forward network between
consecutive ones (the authors: cross-attention -> FFN -> cross-attention).

The default block is the authors' (HITsz-TMG/RaSeRec, ``recbole/model/layers.py``
``CrossMultiHeadAttention`` and ``raserec.py`` ``presetting_ram``):

- a cross-attention returns ``dropout(W_o attention(q, K, V))``: no residual connection and no
  LayerNorm (their LayerNorm line is commented out), so a channel cannot pass ``h`` through
  unchanged and has to build its output from the memories;
- the FFN between two cross-attentions keeps RecBole's residual + LayerNorm;
- the RAM keeps PyTorch's default initialisation (they create it after the model's
  ``_init_weights`` pass).

``residual=True`` with ``init_std=0.02`` is this project's earlier block (``LN(q + dropout(...))``
in every cross-attention, RecBole's normal(0, 0.02) initialisation), kept as an ablation: on a
converged encoder it learns ``h~ ~ 0.5 h + 0.5 LN(h)`` and barely uses the memories.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raserec.errors import ConfigError
from raserec.models.layers import FastDropout, init_weights
from raserec.typed_config import coerce_config


@dataclass(frozen=True)
class RAMConfig:
    """RAM, the module that mixes the retrieved memories into the user representation."""

    alpha: float = 0.5
    """Weight of h in h~ = alpha h + (1 - alpha) (beta c1 + (1 - beta) c2); 1 = the pre-trained model."""
    beta: float = 1.0
    """Weight of channel 1 (h_k -> v_k) against channel 2 (v_k -> h_k); a channel of weight 0 is not built."""
    depth: int = 2
    """Cross-attention layers per channel, with a feed-forward network between consecutive ones."""
    num_heads: int = 2
    """Attention heads."""
    inner_size: int = 256
    """Feed-forward inner size."""
    dropout: float = 0.5
    """Dropout on attention probabilities and sublayer outputs."""
    residual: bool = False
    """Wrap every cross-attention in a residual connection + LayerNorm (this project's earlier block,
    an ablation); false = the authors' block."""
    init_std: float | None = None
    """null keeps PyTorch's default initialisation (the authors'); a float applies RecBole's normal(0, std)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"alpha and beta must lie in [0, 1], got alpha={self.alpha}, beta={self.beta}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")

    @classmethod
    def of(cls, value: RAMConfig | Mapping[str, Any] | None) -> RAMConfig:
        """An instance, a mapping (a checkpoint's hyper-parameters) or ``None`` (defaults)."""
        return coerce_config(cls, value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CrossAttention(nn.Module):
    """Multi-head attention of a query over memories: ``dropout(W_o attn(q, k, v))`` (the authors'),
    or with ``residual`` RecBole's ``LN(q + dropout(W_o attn(q, k, v)))``."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, eps: float, residual: bool = False) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_dropout = dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = FastDropout(dropout)
        self.residual = residual
        self.norm = nn.LayerNorm(hidden_size, eps=eps) if residual else None

    def _heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """``query`` ``[B, 1, d]``, ``keys``/``values`` ``[B, K, d]``, ``mask`` ``[B, K]`` (True =
        attend; every row must have at least one True, see :class:`RetrievalAugmentedModule`)."""
        b, n, d = query.shape
        q, k, v = self._heads(self.query(query)), self._heads(self.key(keys)), self._heads(self.value(values))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(b, n, d)
        out = self.dropout(self.out(ctx))
        return self.norm(query + out) if self.norm is not None else out


class FeedForward(nn.Module):
    """RecBole's FeedForward: ``LN(x + dropout(W_2 GELU(W_1 x)))``."""

    def __init__(self, hidden_size: int, inner_size: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, inner_size), nn.GELU(), nn.Linear(inner_size, hidden_size))
        self.dropout = FastDropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.net(x)))


class Channel(nn.Module):
    """``depth`` cross-attention layers over the same memory, an FFN between consecutive ones."""

    def __init__(self, hidden_size: int, depth: int, num_heads: int, inner_size: int, dropout: float,
                 eps: float, residual: bool = False) -> None:
        super().__init__()
        self.attention = nn.ModuleList(CrossAttention(hidden_size, num_heads, dropout, eps, residual)
                                       for _ in range(depth))
        self.ffn = nn.ModuleList(FeedForward(hidden_size, inner_size, dropout, eps) for _ in range(depth - 1))

    def forward(self, h: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        x = h.unsqueeze(1)
        for i, attention in enumerate(self.attention):
            x = attention(x, keys, values, mask)
            if i < len(self.ffn):
                x = self.ffn[i](x)
        return x.squeeze(1)


class RetrievalAugmentedModule(nn.Module):
    """h~ from h and K retrieved memories (Eq. 9-11).

    Masked (empty) memory slots are ignored by attention. A row with no valid memory at all gets
    ``h~ = h`` exactly (attention over nothing is undefined; without memory there is nothing to
    augment with). ``alpha == 1`` or ``K == 0`` returns ``h`` itself, so the scores equal the
    pre-trained model's bit for bit. A channel whose weight is 0 (``beta`` 0 or 1) is not built.

    Args:
        hidden_size: d.
        alpha: weight of h in h~.
        beta: weight of channel 1 (h_k -> v_k) against channel 2 (v_k -> h_k).
        depth: cross-attention layers per channel (FFN between consecutive ones).
        num_heads: attention heads.
        inner_size: FFN inner size.
        dropout: dropout on attention probabilities and sublayer outputs.
        layer_norm_eps: LayerNorm epsilon.
        residual: wrap every cross-attention in a residual connection + LayerNorm (this project's
            earlier block, an ablation); ``False`` = the authors' block.
        init_std: ``None`` keeps PyTorch's default initialisation (the authors'); a float applies
            RecBole's normal(0, init_std) weights and zero biases.
    """

    def __init__(self, hidden_size: int, alpha: float = 0.5, beta: float = 1.0, depth: int = 2, num_heads: int = 2,
                 inner_size: int = 256, dropout: float = 0.5, layer_norm_eps: float = 1e-12,
                 residual: bool = False, init_std: float | None = None) -> None:
        super().__init__()
        # One place validates the settings: the typed config (raises ConfigError).
        RAMConfig(alpha, beta, depth, num_heads, inner_size, dropout, residual, init_std)
        self.hidden_size = hidden_size
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.residual = bool(residual)
        args = (hidden_size, depth, num_heads, inner_size, dropout, layer_norm_eps, self.residual)
        self.channel1 = Channel(*args) if beta > 0.0 else None
        self.channel2 = Channel(*args) if beta < 1.0 else None
        if init_std is not None:
            self.apply(partial(init_weights, std=init_std))

    @classmethod
    def from_config(cls, hidden_size: int, config: RAMConfig) -> RetrievalAugmentedModule:
        return cls(hidden_size, alpha=config.alpha, beta=config.beta, depth=config.depth, num_heads=config.num_heads,
                   inner_size=config.inner_size, dropout=config.dropout, residual=config.residual,
                   init_std=config.init_std)

    def forward(self, h: Tensor, h_k: Tensor, v_k: Tensor, mask: Tensor) -> Tensor:
        """``h`` ``[B, d]``; ``h_k``, ``v_k`` ``[B, K, d]``; ``mask`` ``[B, K]`` -> h~ ``[B, d]``."""
        if self.alpha == 1.0 or h_k.size(1) == 0:
            return h
        has_memory = mask.any(dim=1)
        if not bool(has_memory.any()):
            return h
        # Rows without memory attend to their (zero) padding slots just to stay finite; their
        # output is replaced by h below.
        safe = mask | ~has_memory.unsqueeze(1)
        augmented = torch.zeros_like(h)
        if self.channel1 is not None:
            augmented = augmented + self.beta * self.channel1(h, h_k, v_k, safe)
        if self.channel2 is not None:
            augmented = augmented + (1.0 - self.beta) * self.channel2(h, v_k, h_k, safe)
        out = self.alpha * h + (1.0 - self.alpha) * augmented
        return torch.where(has_memory.unsqueeze(1), out, h)


def holds_residual_block(keys: Iterable[str]) -> bool:
    """Whether RAM state-dict ``keys`` come from the residual block: only its cross-attentions
    carry a LayerNorm (checkpoints written before ``residual`` existed hold that block)."""
    return any(re.search(r"attention\.\d+\.norm\.", key) for key in keys)
