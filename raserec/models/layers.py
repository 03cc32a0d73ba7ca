"""Layers shared by the encoders, the RAM and the Ada-Retrieval adapters (pure torch)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raserec.errors import ConfigError


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """RecBole's initialisation, for ``model.apply(partial(init_weights, std=...))``: Linear and
    Embedding weights normal(0, std), Linear biases 0, LayerNorm weight 1 and bias 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)



def keep_mask(x: Tensor, p: float) -> Tensor:
    """Inverted-dropout multiplier for ``x``: ``1 / (1 - p)`` with probability ``1 - p``, else 0
    (independent per element, ``x``'s shape, dtype and device).

    When ``p`` is a multiple of 1/256 (0.5, 0.25, ...) one random byte per element decides it,
    exactly: ``P(byte >= 256 p) = 1 - p``, and eight bytes come from one 64-bit draw (the
    generator's cost is per draw: 2.3x faster than ``rand`` on a 7000 x 256 mask). Other rates
    compare a float draw with ``p``."""
    threshold = p * 256
    if threshold == int(threshold):
        n = x.numel()
        bits = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
        keep = bits.view(torch.uint8)[:n].view(x.shape) >= int(threshold)
        return keep.to(x.dtype).mul_(1.0 / (1.0 - p))
    return float_keep_mask(x, p)


def float_keep_mask(x: Tensor, p: float) -> Tensor:
    """:func:`keep_mask` from a float draw per element compared with ``p`` (any rate): made in
    place in the draw's own buffer, no bool tensor and no bool -> float copy."""
    return torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))


class FastDropout(nn.Module):
    """Inverted dropout with the mask of :func:`keep_mask`: same distribution as ``nn.Dropout``,
    much faster on CPU, where ``bernoulli_`` dominates a SASRec training step at p = 0.5."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        # values and gradients equal x * keep / (1 - p)
        return x * keep_mask(x, self.p)


class SelfAttentionBlock(nn.Module):
    """Post-LN Transformer block: multi-head self-attention, then a GELU feed-forward network."""

    def __init__(self, hidden_size: int, num_heads: int, inner_size: int, dropout: float, attn_dropout: float,
                 eps: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(hidden_size, inner_size), nn.GELU(), nn.Linear(inner_size, hidden_size))
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = FastDropout(dropout)
        self.attn_drop = FastDropout(attn_dropout)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool = False) -> Tensor:
        """Attention of ``q`` over ``k``/``v``. ``mask`` (bool, True = may attend) or, when it is
        ``None``, ``is_causal`` (a square causal pattern) or nothing (every key is real)."""
        if not self.training or self.attn_dropout == 0.0:
            # Rows whose keys are all masked (left padding) come out as zeros, never NaN.
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and is_causal)
        # Written out so the attention dropout is FastDropout's draw: on CPU, SDPA's
        # bernoulli_ mask costs more than the attention arithmetic. A finite fill keeps rows
        # whose keys are all padding finite (they are never read), so no NaN reaches backward.
        scores = (q @ k.transpose(-2, -1)).mul_(q.size(-1) ** -0.5)
        if mask is None and is_causal:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        if mask is not None:
            scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        return self.attn_drop(scores.softmax(-1)) @ v

    def _post(self, residual: Tensor, ctx: Tensor) -> Tensor:
        x = self.norm1(residual + self.dropout(self.out(ctx)))
        return self.norm2(x + self.dropout(self.ffn(x)))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Dense form: ``x`` is ``[B, T, d]``."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        ctx = self._attend(q, k, v, mask).transpose(1, 2).reshape(b, t, d)
        return self._post(x, ctx)

    def forward_packed(self, x: Tensor, layout: PackedLayout, last_only: bool = False) -> Tensor:
        """Packed form: ``x`` is ``[n_real, d]``, the real tokens of the length-sorted rows
        (:class:`PackedLayout`). Attention runs per bucket: on a view of the tokens when the bucket
        holds one length, else on a left-padded grid as wide as its longest row. With
        ``last_only`` only each row's last position is computed and ``[B, d]`` (sorted rows) is
        returned."""
        d = x.size(1)
        h, dh = self.num_heads, d // self.num_heads
        if last_only:
            # Queries only where they are read (each row's last token); keys and values everywhere.
            # Same arithmetic as slicing a full projection, without a third of its matmul.
            residual = x.index_select(0, layout.last_token)
            w_q, w_kv = self.qkv.weight.split([d, 2 * d])
            b_q, b_kv = self.qkv.bias.split([d, 2 * d])
            projected, projections = F.linear(x, w_kv, b_kv), 2
            queries = F.linear(residual, w_q, b_q).view(-1, h, 1, dh)
            query_chunks = queries.split([b.rows for b in layout.buckets])
        else:
            residual, projected, projections = x, self.qkv(x), 3
        # split (not slicing) so that backward is one concatenation, not a zero-filled copy per bucket
        chunks = projected.split([b.tokens for b in layout.buckets]) if len(layout.buckets) > 1 else (projected,)
        parts = []
        for i, (bucket, chunk) in enumerate(zip(layout.buckets, chunks, strict=True)):
            n, w = bucket.rows, bucket.width
            if bucket.grid_pos is not None:
                chunk = chunk.new_zeros(n * w, projections * d).index_copy(0, bucket.grid_pos, chunk)
            heads = chunk.view(n, w, projections, h, dh).permute(2, 0, 3, 1, 4)
            if last_only:
                k, v = heads
                # The last query sees every real key: no causal cut for a single-length bucket.
                last_mask = None if bucket.mask is None else bucket.mask[:, :, -1:]
                parts.append(self._attend(query_chunks[i], k, v, last_mask).reshape(n, d))
            else:
                q, k, v = heads
                ctx = self._attend(q, k, v, bucket.mask, is_causal=True).transpose(1, 2).reshape(n * w, d)
                parts.append(ctx if bucket.grid_pos is None else ctx.index_select(0, bucket.grid_pos))
        ctx = torch.cat(parts) if len(parts) > 1 else parts[0]
        return self._post(residual, ctx)


#: Fewest rows a length bucket of :class:`PackedLayout` gathers before it closes. A bucket holding
#: one length is a view of the packed tokens (no grid, no mask); one of several lengths is padded
#: into a grid. 64 was the fastest of 1, 32, 64 and 128 on the 2-core CPU (2026-12-04, encoder
#: forward + backward in training mode): SRA-CL's 3,328-row steps 669 -> 383 ms against the
#: power-of-two buckets used before, us_x's 768 rows 59 -> 58 ms, a SASRec batch of 1,024 69 -> 66
#: ms; one bucket per length (1) lost on the small batches (70 and 80 ms: too many small calls).
PACK_MIN_ROWS = 64


class PackedLayout(NamedTuple):
    """Where every real token of a left-padded batch lives once its rows are *sorted by length*
    (``order``): the packed tokens of each bucket of consecutive lengths are then one contiguous
    run, so a bucket of a single length is a view of them and needs no grid."""

    order: Tensor  # sorted position -> batch row (stable sort by length)
    inverse: Tensor  # batch row -> sorted position
    sorted_rows: bool  # ``order`` is the identity (no permutation needed)
    buckets: list[_Bucket]
    last_token: Tensor  # packed (sorted) index of each sorted row's last token

    @staticmethod
    def build(input_ids: Tensor, min_rows: int | None = None) -> PackedLayout:
        """The layout of a left-padded ``[B, T]`` batch; buckets close once they hold ``min_rows``
        rows (default :data:`PACK_MIN_ROWS`)."""
        min_rows = PACK_MIN_ROWS if min_rows is None else min_rows
        real = input_ids > 0
        if bool((~real[:, -1]).any()):
            raise ValueError("empty input sequence (all padding) in the batch")
        lengths = real.sum(1)
        order = torch.argsort(lengths, stable=True)
        lens = lengths.index_select(0, order)
        device = input_ids.device
        values, counts = torch.unique_consecutive(lens, return_counts=True)
        runs, current, rows = [], [], 0
        for length, count in zip(values.tolist(), counts.tolist(), strict=True):
            current.append((length, count))
            rows += count
            if rows >= min_rows:
                runs.append(current)
                current, rows = [], 0
        if current:
            runs.append(current)
        buckets = []
        for run in runs:
            n, width = sum(c for _, c in run), run[-1][0]
            tokens = sum(length * c for length, c in run)
            if len(run) == 1:
                buckets.append(_Bucket(n, width, tokens, None, None))
                continue
            blens = torch.cat([torch.full((c,), length, device=device) for length, c in run])
            col = torch.arange(width, device=device)
            valid = col.unsqueeze(0) >= (width - blens).unsqueeze(1)  # [n, w] left padding
            grid_pos = (torch.arange(n, device=device).unsqueeze(1) * width + col)[valid]
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            buckets.append(_Bucket(n, width, tokens, grid_pos, (causal & valid[:, None, :]).unsqueeze(1)))
        sorted_rows = bool((order == torch.arange(len(order), device=device)).all())
        return PackedLayout(order, torch.argsort(order), sorted_rows, buckets, lens.cumsum(0) - 1)


class _Bucket(NamedTuple):
    rows: int  # sequences in this bucket (consecutive in the sorted order)
    width: int  # longest sequence in the bucket
    tokens: int  # real tokens of its rows (a contiguous run of the packed tokens)
    grid_pos: Tensor | None  # of each token in the flat [rows * width] grid; None: one length, no grid
    mask: Tensor | None  # [rows, 1, width, width] causal + padding mask; None: causality only
