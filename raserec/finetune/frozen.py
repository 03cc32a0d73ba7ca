"""A frozen pre-trained encoder inside a fine-tuning module: loaded from its record, never
trained, kept in eval mode, and used only on the data it was pre-trained on."""

from __future__ import annotations

from typing import Any

from torch import nn

from raserec.checkpoint import check_same_data, load_encoder_for
from raserec.models.encoders.base import SequenceEncoder


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode (dropout off), in place; returns ``module``."""
    return module.requires_grad_(False).eval()


def load_frozen_encoder(path: str, num_items: int | None) -> tuple[SequenceEncoder, dict[str, Any]]:
    """The encoder recorded in ``path`` (weights-only, fingerprint checked), frozen, and the data
    fingerprint it was pre-trained on."""
    encoder, fingerprint = load_encoder_for(path, num_items)
    freeze(encoder)
    return encoder, fingerprint


class FrozenEncoderMixin:
    """For a LightningModule that holds frozen encoders (listed by :meth:`frozen_modules`).

    Lightning calls ``train()`` at every epoch start, which would switch their dropout back on and
    make the memory bank's keys stale: :meth:`train` keeps them in eval mode. :meth:`setup`
    refuses data other than the encoder was pre-trained on (item ids would silently mean other
    items) unless the hyper-parameter ``allow_other_data`` is true. The module sets
    ``self.encoder_data`` (the fingerprint from :func:`load_frozen_encoder`).
    """

    encoder_data: dict[str, Any]

    def frozen_modules(self) -> list[nn.Module]:
        """The modules that must stay frozen (eval mode, no gradients)."""
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        for module in self.frozen_modules():
            module.eval()
        return self

    def check_encoder_data(self, datamodule: Any) -> None:
        """Raise :class:`~raserec.errors.CheckpointError` if ``datamodule`` holds other data than
        the frozen encoder was pre-trained on (and ``allow_other_data`` is false)."""
        check_same_data(self.encoder_data, datamodule, bool(self.hparams.get("allow_other_data", False)))  # type: ignore[attr-defined]

    def setup(self, stage: str) -> None:
        super().setup(stage)  # type: ignore[misc]
        self.check_encoder_data(getattr(self.trainer, "datamodule", None))  # type: ignore[attr-defined]
