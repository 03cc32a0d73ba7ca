"""The interface every backbone implements, so training code never depends on a backbone."""

from __future__ import annotations

import inspect
import sys
from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn


class SequenceEncoder(nn.Module, ABC):
    """Maps left-padded item ids ``[B, T]`` (0 = padding, most recent item last) to a user
    representation ``[B, d]``. Owns the item embedding table ``[num_items + 1, d]``, which is
    also the output layer (scores = h . V^T).

    Subclasses call ``self.record_init_args(locals())`` in ``__init__`` (first thing, or right after
    ``super().__init__`` when they forward ``**kwargs`` to it) so a checkpoint can rebuild them from
    the class path and arguments alone.
    """

    item_embedding: nn.Embedding
    hidden_size: int
    max_len: int

    def record_init_args(self, local_vars: dict[str, Any]) -> None:
        """Record the calling ``__init__``'s named parameters from its ``locals()`` (taken before
        anything else is assigned). A class that forwards ``**kwargs`` to its parent's
        ``__init__`` calls this after ``super().__init__``: its own arguments are added to those
        the parent recorded. What is kept is what ``type(self).__init__`` accepts, so a subclass
        with a narrower signature still rebuilds from its record."""
        code = sys._getframe(1).f_code  # the caller's parameter names (no frame object kept alive)
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        recorded = {**getattr(self, "init_args", {}), **{k: local_vars[k] for k in names if k != "self"}}
        accepted = inspect.signature(type(self).__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            recorded = {k: v for k, v in recorded.items() if k in accepted}
        self.init_args = recorded

    def unrecorded_init_args(self) -> list[str]:
        """Named parameters of ``type(self).__init__`` missing from ``init_args`` (a subclass that
        forgot :meth:`record_init_args`): a record without them would rebuild with defaults."""
        params = inspect.signature(type(self).__init__).parameters.values()
        named = [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        return [k for k in named if k not in getattr(self, "init_args", {})]

    @property
    def class_path(self) -> str:
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}"

    @abstractmethod
    def forward(self, input_ids: Tensor, item_embeddings: Tensor | None = None) -> Tensor:
        """User representation of each sequence: ``[B, d]``.

        ``item_embeddings`` (``[B, T, d]``), when given, replaces the lookup of ``input_ids`` in
        the item table (for adapters that transform the history embeddings); ``input_ids`` still
        defines which positions are real."""

    def item_weights(self) -> Tensor:
        """Embeddings of the real items (rows 1..N), the candidates of full ranking: ``[N, d]``."""
        return self.item_embedding.weight[1:]

    def score(self, user_repr: Tensor) -> Tensor:
        """Scores over all real items: ``[B, N]``; column ``j`` is item ``j + 1``."""
        return user_repr @ self.item_weights().T
