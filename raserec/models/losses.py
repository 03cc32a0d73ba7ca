"""Training objectives shared by pre-training and fine-tuning."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def next_item_loss(user_repr: Tensor, item_weights: Tensor, target: Tensor) -> Tensor:
    """Full-softmax cross-entropy of ``h . V^T`` over all real items against the next item.

    ``item_weights`` holds rows 1..N (padding excluded), so item ``i`` is class ``i - 1``.
    """
    return F.cross_entropy(user_repr @ item_weights.T, target - 1)


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
