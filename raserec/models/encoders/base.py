"""The interface every backbone implements, so training code never depends on a backbone."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn


class SequenceEncoder(nn.Module, ABC):
    """Maps left-padded item ids ``[B, T]`` (0 = padding, most recent item last) to a user
    representation ``[B, d]``. Owns the item embedding table ``[num_items + 1, d]``, which is
    also the output layer (scores = h . V^T).

    Subclasses call ``self.record_init_args(locals())`` first thing in ``__init__`` so a
    checkpoint can rebuild them from the class path and arguments alone.
    """

    item_embedding: nn.Embedding
    hidden_size: int
    max_len: int

    def record_init_args(self, local_vars: dict[str, Any]) -> None:
        """Record the calling ``__init__``'s named parameters from its ``locals()``. A subclass
        that forwards ``**kwargs`` to its parent's ``__init__`` calls this after ``super().__init__``:
        its own arguments are added to those the parent recorded."""
        frame = inspect.currentframe()
        code = frame.f_back.f_code if frame is not None and frame.f_back is not None else None
        if code is None:  # no frame introspection (not CPython): fall back to the class signature
            names = [k for k in inspect.signature(type(self).__init__).parameters if k in local_vars]
        else:
            names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        own = {k: local_vars[k] for k in names if k != "self"}
        self.init_args = {**getattr(self, "init_args", {}), **own}

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
