"""BERT4Rec (Sun et al., 2019): a bidirectional Transformer over the item sequence.

Positions are aligned by recency as in SASRec (the most recent slot is position ``max_len - 1``).
As a next-item encoder (:meth:`BERT4Rec.forward`) a [mask] token is appended after the most
recent item and its hidden state is the user representation (RecBole's inference). With recency
positions that is exactly the cloze training case "the most recent item is masked", so the
cloze objective (:meth:`BERT4Rec.cloze_loss`) and next-item use agree on where [mask] sits.

The item table keeps the interface's ``num_items + 1`` rows (it is the output layer); [mask] is
a separate learnable vector, so it can never be recommended.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from raserec.errors import ConfigError
from raserec.models.encoders.transformer import TransformerEncoder
from raserec.models.losses import next_item_loss


class BERT4Rec(TransformerEncoder):
    """Bidirectional self-attention encoder with a masked-item (cloze) objective.

    The Transformer arguments (``hidden_size``, ``max_len``, ``num_layers``, ...) are
    :class:`~raserec.models.encoders.transformer.TransformerEncoder`'s; for next-item use the
    appended [mask] takes one of the ``max_len`` slots, so a full ``max_len`` history loses its
    oldest item.

    Args:
        num_items: number of real items (the table has ``num_items + 1`` rows; row 0 = padding).
        mask_ratio: probability that each real item is masked by :meth:`cloze_loss`.
        ft_ratio: fraction of sequences in which :meth:`cloze_loss` masks only the most recent
            item (BERT4Rec's next-item-like samples; RecBole's ``ft_ratio``).
        kwargs: the Transformer arguments.
    """

    def __init__(self, num_items: int, *, mask_ratio: float = 0.2, ft_ratio: float = 0.0, **kwargs: Any) -> None:
        if not 0.0 < mask_ratio <= 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        if not 0.0 <= ft_ratio <= 1.0:
            raise ConfigError(f"ft_ratio must be in [0, 1], got {ft_ratio}")
        super().__init__(num_items, **kwargs)
        self.record_init_args(locals())
        if self.max_len < 2:
            raise ConfigError(f"max_len must be >= 2 (one history item + [mask]), got {self.max_len}")
        self.mask_ratio = mask_ratio
        self.ft_ratio = ft_ratio
        # Created after the trunk's initialisation pass (which draws its own numbers first).
        self.mask_token = nn.Parameter(torch.empty(self.hidden_size))
        nn.init.normal_(self.mask_token, 0.0, self.init_std)

    def hidden_states(self, input_ids: Tensor, masked: Tensor | None = None,
                      item_embeddings: Tensor | None = None) -> Tensor:
        """Hidden states of every position ``[B, T, d]`` (padding rows are meaningless).

        ``masked`` (bool ``[B, T]``) marks positions whose input is the [mask] token; their ids
        must be non-zero (any real id: it is not read). ``item_embeddings`` optionally replaces
        the table lookup of ``input_ids``."""
        positions = self.positions(input_ids)
        emb = self.item_embedding(input_ids) if item_embeddings is None else item_embeddings
        if masked is not None:
            emb = torch.where(masked.unsqueeze(-1), self.mask_token.to(emb.dtype), emb)
        x = self.embed(emb, positions)
        # Bidirectional: every position attends to every real position; only padding keys are masked.
        mask = (input_ids > 0)[:, None, None, :]  # [B, 1, 1, T]
        for block in self.blocks:
            x = block(x, mask)
        return x

    def forward(self, input_ids: Tensor, item_embeddings: Tensor | None = None) -> Tensor:
        """User representation ``[B, d]``: the hidden state of a [mask] appended after the most
        recent item. ``item_embeddings`` (``[B, T, d]``) optionally replaces the table lookup."""
        self.positions(input_ids)  # checks the shape and length
        b = input_ids.size(0)
        # Columns that are padding in every row change nothing (keys masked, positions by recency):
        # drop them; then keep max_len - 1 history slots so [mask] fits (drops the oldest item).
        width = min(_real_width(input_ids), self.max_len - 1)
        ids = torch.cat([input_ids[:, input_ids.size(1) - width:], input_ids.new_ones(b, 1)], 1)
        masked = torch.zeros_like(ids, dtype=torch.bool)
        masked[:, -1] = True
        emb = None
        if item_embeddings is not None:
            hist = item_embeddings[:, item_embeddings.size(1) - width:]
            emb = torch.cat([hist, hist.new_zeros(b, 1, hist.size(-1))], 1)  # last slot replaced by [mask]
        return self.hidden_states(ids, masked, emb)[:, -1]

    def cloze_mask(self, input_ids: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Which positions :meth:`cloze_loss` masks (bool ``[B, T]``): each real item with
        probability ``mask_ratio`` and at least one per non-empty row; in a fraction ``ft_ratio``
        of the rows only the most recent item."""
        real = input_ids > 0
        b, t = input_ids.shape
        dev = input_ids.device
        masked = real & (torch.rand(b, t, generator=generator, device=dev) < self.mask_ratio)
        # Rows where nothing was drawn get one uniformly chosen real position.
        pick = torch.where(real, torch.rand(b, t, generator=generator, device=dev), -1.0).argmax(1)
        empty = ~masked.any(1) & real.any(1)
        masked[empty, pick[empty]] = True
        if self.ft_ratio > 0:
            last_only = (torch.rand(b, generator=generator, device=dev) < self.ft_ratio) & real[:, -1]
            masked[last_only] = False
            masked[last_only, -1] = True
        return masked

    def cloze_loss(self, input_ids: Tensor, target: Tensor | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
        """Masked-item loss: full-softmax cross-entropy over all real items at the masked positions.

        ``target`` (``[B]``), when given, is appended as the most recent item (dropping the oldest
        column when the input is already ``max_len`` wide), so training targets are also masked
        and predicted. ``input_ids`` is never modified."""
        ids = input_ids
        if target is not None:
            ids = torch.cat([ids, target.unsqueeze(1)], 1)[:, -self.max_len:]
        ids = ids[:, ids.size(1) - _real_width(ids):]  # a new view; masking never writes to it
        masked = self.cloze_mask(ids, generator)
        h = self.hidden_states(ids, masked)[masked]  # [n_masked, d]
        return next_item_loss(h, self.item_weights(), ids[masked])


def _real_width(input_ids: Tensor) -> int:
    """Width of the left-padded batch once the columns that are padding in every row are dropped."""
    any_real = (input_ids > 0).any(0)
    if not bool(any_real.any()):
        return 1
    return input_ids.size(1) - int(any_real.int().argmax())
