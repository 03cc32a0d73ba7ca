"""Ada-Retrieval's adapters (pure torch): the learnable filter layer and the item and user
representation adapters (IRA, URA) of the paper's Eq. 6-14.

Both adapters sit *around* an unchanged backbone: IRA rewrites the history item embeddings
before the encoder sees them (through ``SequenceEncoder.forward(..., item_embeddings=...)``),
URA rewrites the encoder's output. With no context (round 1) both are the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raserec.errors import ConfigError
from raserec.models.layers import FastDropout


def _init_linear(module: nn.Module, std: float) -> None:
    # The authors initialise the adapters like their backbones: normal(0, std) weights, zero biases.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class FilterLayer(nn.Module):
    """Learnable frequency-domain filter over a block of ``k`` retrieved items (Eq. 6-9).

    ``x`` ``[B, k, d]`` -> rFFT along the item axis (orthonormal) -> times a learnable complex
    filter ``[k // 2 + 1, d]`` -> inverse rFFT -> ``Linear(d, d)`` -> dropout -> residual +
    LayerNorm: ``LayerNorm(x + Dropout(Linear(irfft(W * rfft(x)))))``.

    Args:
        k: items per block (the length of the FFT axis).
        hidden_size: embedding size d.
        dropout: dropout on the filtered branch.
        layer_norm_eps: LayerNorm epsilon.
        init_std: standard deviation of the filter's and the linear layer's initialisation.
    """

    def __init__(self, k: int, hidden_size: int, dropout: float = 0.2, layer_norm_eps: float = 1e-12,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        self.k = k
        # Stored as real [..., 2] (not a complex parameter) so optimisers, state-dict hashing and
        # distributed reductions see an ordinary float tensor; viewed as complex in forward.
        self.complex_weight = nn.Parameter(torch.randn(k // 2 + 1, hidden_size, 2) * init_std)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = FastDropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        _init_linear(self.dense, init_std)

    @property
    def filter(self) -> Tensor:
        """The complex filter ``[k // 2 + 1, d]``."""
        return torch.view_as_complex(self.complex_weight)

    def spectral(self, x: Tensor) -> Tensor:
        """``irfft(W * rfft(x))`` along the item axis, by FFT (the definition; ``[B, k, d]``)."""
        if x.size(1) != self.k:
            raise ValueError(f"expected blocks of {self.k} items, got {x.size(1)}")
        # FFTs run in float32 even under autocast (cuFFT half precision needs power-of-two sizes).
        spectrum = torch.fft.rfft(x.float(), dim=1, norm="ortho")
        return torch.fft.irfft(spectrum * self.filter, n=self.k, dim=1, norm="ortho").to(x.dtype)

    def filter_matrix(self) -> Tensor:
        """The filter as the linear map it is: ``M`` ``[k, k, d]`` with
        ``filtered(x)[b, i, c] = sum_j M[j, i, c] x[b, j, c]`` (one k x k circulant per channel),
        obtained by filtering the k unit blocks."""
        eye = torch.eye(self.k, device=self.complex_weight.device, dtype=self.complex_weight.dtype)
        return self.spectral(eye.unsqueeze(-1).expand(self.k, self.k, self.complex_weight.size(1)))

    def filtered(self, x: Tensor) -> Tensor:
        """The filtered block ``irfft(W * rfft(x))`` ``[B, k, d]``, computed as a batched k x k
        product per channel: equal to :meth:`spectral` up to float rounding (tested) and several
        times cheaper than three FFTs over the batch (plus their backward) for blocks of 20."""
        if x.size(1) != self.k:
            raise ValueError(f"expected blocks of {self.k} items, got {x.size(1)}")
        return torch.einsum("bjc,jic->bic", x, self.filter_matrix().to(x.dtype))

    def branch(self, x: Tensor) -> Tensor:
        """The deterministic part of the filtered branch, ``Linear(filtered(x))``: what a block
        contributes before dropout, so a caller that re-uses a block in several rounds computes
        it once (:meth:`finish` then draws each round's dropout afresh)."""
        return self.dense(self.filtered(x))

    def finish(self, x: Tensor, branch: Tensor) -> Tensor:
        """``LayerNorm(x + Dropout(branch))`` for ``branch = self.branch(x)``."""
        return self.norm(x + self.dropout(branch))

    def forward(self, x: Tensor) -> Tensor:
        return self.finish(x, self.branch(x))


class ItemRepresentationAdapter(nn.Module):
    """IRA (Eq. 4, 6-12): recalibrates the history item embeddings with the items earlier rounds
    retrieved.

    Each earlier round's block of ``k`` retrieved item embeddings goes through a
    :class:`FilterLayer`; the filtered blocks are concatenated into the context ``H``; then a
    single-head, projection-free context-aware attention with queries = history embeddings
    ``E``, keys = values = ``H``: ``LayerNorm(E + Dropout(softmax(E H^T / sqrt(d)) H))``.

    Args:
        hidden_size: embedding size d.
        k: items per retrieved block.
        num_blocks: how many blocks can ever be context (rounds - 1); with
            ``filter_per_round`` each gets its own filter layer.
        dropout: dropout of the filter layers and of the attention output.
        filter_per_round: one filter layer per earlier round's block; ``False`` shares one
            filter layer across blocks, as the authors' code does.
        layer_norm_eps: LayerNorm epsilon.
        init_std: standard deviation of the normal initialisation.
    """

    def __init__(self, hidden_size: int, k: int, num_blocks: int, dropout: float = 0.2,
                 filter_per_round: bool = False, layer_norm_eps: float = 1e-12, init_std: float = 0.02) -> None:
        super().__init__()
        n_filters = max(num_blocks, 1) if filter_per_round else 1
        self.filters = nn.ModuleList(
            FilterLayer(k, hidden_size, dropout, layer_norm_eps, init_std) for _ in range(n_filters))
        self.dropout = FastDropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def filter_for(self, index: int) -> FilterLayer:
        """The filter layer of the ``index``-th earlier round's block."""
        return self.filters[index if len(self.filters) > 1 else 0]

    def context(self, blocks: Sequence[Tensor], branches: Sequence[Tensor] | None = None) -> Tensor:
        """The filtered item context ``H``: ``[B, len(blocks) * k, d]``, each block through its
        filter layer. ``branches`` (each block's :meth:`FilterLayer.branch`, computed once by a
        caller that re-uses blocks over rounds) skips recomputing the deterministic part; dropout
        is drawn afresh either way."""
        if branches is None:
            branches = [self.filter_for(i).branch(b) for i, b in enumerate(blocks)]
        pairs = enumerate(zip(blocks, branches, strict=True))
        return torch.cat([self.filter_for(i).finish(b, br) for i, (b, br) in pairs], dim=1)

    def attend(self, history: Tensor, context: Tensor, real: Tensor | None = None) -> Tensor:
        """Context-aware attention + residual + LayerNorm (Eq. 11-12).

        ``real`` (bool ``[B, L]``) marks the history's real items: the residual, dropout and
        LayerNorm then run on those positions only, and padding positions keep ``history``.
        Encoders never read padding positions, so this changes no output, only the work.
        """
        # Projection-free scaled dot product (scale 1/sqrt(d)); every context slot is a real item,
        # so no mask.
        attended = F.scaled_dot_product_attention(history, context, context)
        if real is None:
            return self.norm(history + self.dropout(attended))
        d = history.size(-1)
        flat = history.reshape(-1, d)
        at = real.reshape(-1).nonzero().squeeze(1)
        values = self.norm(flat.index_select(0, at) + self.dropout(attended.reshape(-1, d).index_select(0, at)))
        return flat.index_copy(0, at, values).view_as(history)

    def forward(self, history: Tensor, blocks: Sequence[Tensor], real: Tensor | None = None,
                branches: Sequence[Tensor] | None = None) -> Tensor:
        """Adapted history embeddings ``[B, L, d]``; the identity when there is no context.

        Args:
            history: history item embeddings ``E`` ``[B, L, d]`` (before positions/LayerNorm).
            blocks: the earlier rounds' retrieved item embeddings, ``[B, k, d]`` each, in order.
            real: optional bool ``[B, L]`` of real (non-padding) positions; see :meth:`attend`.
            branches: optional precomputed :meth:`FilterLayer.branch` of each block.
        """
        if len(blocks) == 0:
            return history
        return self.attend(history, self.context(blocks, branches), real)


class UserRepresentationAdapter(nn.Module):
    """URA (Eq. 5, 13-14): fuses the current user representation with the earlier rounds'.

    A 1-layer GRU (d -> d) runs over the earlier rounds' adapted representations; with its last
    state ``h``: ``LayerNorm(u + Dropout(MLP([u ; h])))``, MLP = Linear(2d, 2d) -> ReLU ->
    Linear(2d, d).

    Args:
        hidden_size: representation size d.
        dropout: dropout on the MLP output.
        layer_norm_eps: LayerNorm epsilon.
        init_std: standard deviation of the MLP's normal initialisation (the GRU keeps PyTorch's).
    """

    def __init__(self, hidden_size: int, dropout: float = 0.2, layer_norm_eps: float = 1e-12,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.gru = nn.GRU(hidden_size, hidden_size, num_layers=1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden_size, 2 * hidden_size), nn.ReLU(),
                                 nn.Linear(2 * hidden_size, hidden_size))
        self.dropout = FastDropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp.apply(lambda m: _init_linear(m, init_std))

    def forward(self, user: Tensor, context: Tensor) -> Tensor:
        """Adapted representation ``[B, d]``; the identity when there is no context.

        Args:
            user: this round's encoder output ``u_t`` ``[B, d]``.
            context: earlier rounds' adapted representations ``[B, t - 1, d]``, oldest first.
        """
        if context.size(1) == 0:
            return user
        _, h = self.gru(context)  # h: [1, B, d], the state after the most recent round
        fused = self.mlp(torch.cat([user, h[-1]], dim=-1))
        return self.norm(user + self.dropout(fused))
