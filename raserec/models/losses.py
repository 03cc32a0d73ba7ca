"""Training objectives shared by pre-training and fine-tuning."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

#: Rows of the ``[rows, N]`` score block :class:`ChunkedSoftmaxCE` holds at a time: small enough
#: to stay in a core's cache for the ~12k items of the Amazon benchmarks.
CE_CHUNK_ROWS = 128


class ChunkedSoftmaxCE(torch.autograd.Function):
    """Mean full-softmax cross-entropy of ``h W^T`` against ``classes``, computed a block of rows
    at a time, with its gradients taken in the same pass (the softmax minus the one-hot is the
    score gradient): the ``[B, N]`` score matrix, its log-softmax and their gradients are never
    materialised. The same function as ``F.cross_entropy(h @ w.T, classes)`` up to float
    rounding (tested); only first-order gradients."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, classes: Tensor, rows: int) -> Tensor:  # type: ignore[override]
        b = h.size(0)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        total = h.new_zeros(())
        block = h.new_empty(min(rows, b), w.size(0))
        arange = torch.arange(min(rows, b), device=h.device)
        for start in range(0, b, rows):
            hc, cls = h[start:start + rows], classes[start:start + rows]
            n = hc.size(0)
            scores = torch.mm(hc, w.t(), out=block[:n])
            lse = torch.logsumexp(scores, 1)
            total += (lse - scores.gather(1, cls[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                grad = scores.sub_(lse[:, None]).exp_()  # softmax, in place
                grad[arange[:n], cls] -= 1.0
                if need_h:
                    torch.mm(grad, w, out=grad_h[start:start + n])
                if need_w:
                    grad_w.addmm_(grad.t(), hc)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.batch, ctx.need = b, (need_h, need_w)
        return total / b

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved gradients are constants: no double backward
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        scale = grad_out / ctx.batch
        grads = [next(saved) * scale if need else None for need in ctx.need]
        return grads[0], grads[1], None, None


def next_item_loss(user_repr: Tensor, item_weights: Tensor, target: Tensor) -> Tensor:
    """Full-softmax cross-entropy of ``h . V^T`` over all real items against the next item.

    ``item_weights`` holds rows 1..N (padding excluded), so item ``i`` is class ``i - 1``.
    When gradients are wanted it runs as :class:`ChunkedSoftmaxCE` (float32, outside autocast);
    otherwise, and under autocast, as ``F.cross_entropy`` over the score matrix.
    """
    classes = target - 1
    wants_grad = torch.is_grad_enabled() and (user_repr.requires_grad or item_weights.requires_grad)
    plain = (user_repr.dtype != torch.float32 or item_weights.dtype != torch.float32
             or torch.is_autocast_enabled(user_repr.device.type))
    if wants_grad and not plain:
        return ChunkedSoftmaxCE.apply(user_repr, item_weights, classes, CE_CHUNK_ROWS)
    return F.cross_entropy(user_repr @ item_weights.T, classes)


def info_nce(
    z1: Tensor, z2: Tensor, temperature: float = 1.0, similarity: Literal["dot", "cos"] = "dot"
) -> Tensor:
    """In-batch InfoNCE: row ``i`` of ``z1`` and row ``i`` of ``z2`` are a positive pair; the other
    ``2(B - 1)`` rows of both views are its negatives (DuoRec's formulation)."""
    b = z1.size(0)
    if b < 2:
        return z1.new_zeros(())
    z = torch.cat([z1, z2], dim=0)
    if similarity == "cos":
        z = F.normalize(z, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'dot' or 'cos', got {similarity!r}")
    sim = (z @ z.T) / temperature
    sim.fill_diagonal_(float("-inf"))
    labels = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, labels)


def sample_negatives(history: Tensor, target: Tensor, num_items: int, n: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """``n`` negatives per row ``[B, n]``, uniform (with replacement) over the items that are
    neither in ``history`` ``[B, L]`` (0 = padding) nor the ``target`` ``[B]``.

    Exact and loop-free: a uniform rank ``r`` among the row's free items is mapped to the
    ``r``-th free item id by counting (``searchsorted``) the excluded ids that precede it, so
    no draw ever collides with the history and nothing needs resampling.
    """
    excluded = torch.cat([history, target.unsqueeze(1)], dim=1)
    b, m = excluded.shape
    srt = excluded.sort(dim=1).values
    fresh = torch.ones_like(srt, dtype=torch.bool)
    fresh[:, 1:] = srt[:, 1:] != srt[:, :-1]
    valid = (srt > 0) & fresh  # distinct real items
    big = num_items + 1
    ids = torch.where(valid, srt, big).sort(dim=1).values  # distinct excluded ids ascending, then `big`
    col = torch.arange(m, device=ids.device)
    # Free items with a smaller id than the j-th excluded one (non-decreasing in j); `big` after.
    before = torch.where(ids <= num_items, ids - 1 - col, torch.full_like(ids, 2 * big)).contiguous()
    free = num_items - valid.sum(1, keepdim=True)  # [B, 1]
    if int(free.min()) < 1:
        raise ValueError("a row's history covers every item: no negative to sample")
    u = torch.rand(b, n, device=ids.device, generator=generator)
    r = torch.minimum((u * free).long(), free - 1)  # 0-based rank among the free items
    return r + 1 + torch.searchsorted(before, r, right=True)


def target_first_bce(logits: Tensor) -> Tensor:
    """Element-wise binary cross-entropy of sampled-candidate scores ``[..., 1 + n]`` whose first
    column is the target (label 1) and the rest sampled negatives (label 0); callers reduce."""
    labels = torch.zeros_like(logits)
    labels[..., 0] = 1.0
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
