"""Stage 2: retrieval-augmented fine-tuning (RAFT). The pre-trained encoder and item embeddings
are frozen; only RAM learns to combine h with K memories retrieved from the memory bank."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from raserec.checkpoint import RECORD_KEY, encoder_record, trust_encoder_module
from raserec.data.batch import SequenceBatch
from raserec.errors import CheckpointError
from raserec.evaluation.module import RecommenderModule
from raserec.finetune.frozen import FrozenEncoderMixin, load_frozen_encoder
from raserec.memory.callback import MemoryBankCallback
from raserec.memory.retriever import BankConfig, MemoryRetriever
from raserec.models.losses import next_item_loss
from raserec.models.ram import RAMConfig, RetrievalAugmentedModule, holds_residual_block

log = logging.getLogger(__name__)


class RAFTModule(FrozenEncoderMixin, RecommenderModule):
    """RaSeRec's second stage: frozen encoder + memory bank + trainable RAM.

    The memory bank belongs to :attr:`retriever` (a :class:`MemoryRetriever` keyed by the frozen
    encoder); the :class:`MemoryBankCallback` this module adds itself (``configure_callbacks``)
    keeps it current before fit, validate, test and predict. The bank is not part of the
    checkpoint (it is rebuilt from the frozen encoder and the data, or loaded from
    ``bank.save_dir``). RAFT checkpoints embed the encoder record, so they can also serve as an
    ``encoder_checkpoint``.

    Args:
        num_items: number of real items (linked from the datamodule by the CLI); must equal the
            checkpoint's.
        encoder_checkpoint: pre-training ``.ckpt`` (or a file from ``save_encoder``).
        bank: the memory bank (K, index, build); see :class:`BankConfig`.
        ram: the RAM (alpha, beta, block); see :class:`RAMConfig`.
        trusted_encoder_modules: module prefixes (e.g. ``mypkg.encoders.``) whose classes an encoder
            record may name, beside raserec's own encoders (records naming anything else are refused).
        allow_other_data: use the encoder even with data other than it was pre-trained on (same
            item count, different content hash); refused by default, since item ids would
            silently mean other items.
        kwargs: the optimiser and evaluation settings every module shares (``lr``, which here
            trains the RAM parameters only, ``weight_decay``, ``metric_ks``, ``mask_history``,
            ``predict_top_n``); see :class:`~raserec.evaluation.module.RecommenderModule`.
    """

    def __init__(
        self,
        num_items: int | None = None,
        *,
        encoder_checkpoint: str,
        bank: BankConfig = BankConfig(),
        ram: RAMConfig = RAMConfig(),
        trusted_encoder_modules: Sequence[str] = (),
        allow_other_data: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # lr (RAM parameters only), weight_decay, evaluation settings
        bank, ram = BankConfig.of(bank), RAMConfig.of(ram)
        self.save_hyperparameters()
        self.save_shared_hyperparameters()
        # Plain dicts in the checkpoint (weights_only loading); load_from_checkpoint passes them back.
        self.hparams["bank"], self.hparams["ram"] = bank.as_dict(), ram.as_dict()
        for prefix in trusted_encoder_modules:
            trust_encoder_module(prefix)
        self.encoder, self.encoder_data = load_frozen_encoder(encoder_checkpoint, num_items)
        self.ram = RetrievalAugmentedModule.from_config(self.encoder.hidden_size, ram)
        self.retriever = MemoryRetriever(self.encoder, bank, self.encoder.item_embedding)
        self._bank_callback: MemoryBankCallback | None = None

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.encoder]

    @property
    def uses_retrieval(self) -> bool:
        return self.retriever.k > 0 and self.ram.alpha < 1.0

    def configure_callbacks(self) -> list[L.Callback]:
        # One instance for the module's lifetime.
        if self._bank_callback is None:
            self._bank_callback = MemoryBankCallback(self.retriever)
        return [self._bank_callback]

    # ---------------------------------------------------------------- forward
    def augment(self, h: Tensor, user: Tensor, end: Tensor, bank_rows: np.ndarray | None = None,
                input_ids: Tensor | None = None) -> Tensor:
        """h~: retrieve K memories for each query (no leakage) and combine them with RAM.
        ``bank_rows``: the queries are these bank entries (memories precomputed per bank build);
        ``input_ids``: the queries' items (needed when the bank is searched by a key function)."""
        if not self.uses_retrieval:
            return h
        rows, mask = self.retriever.neighbours(h, user, end, bank_rows, progress=self._show_progress(),
                                               input_ids=input_ids)
        return self.mix(h, rows, mask)

    def mix(self, h: Tensor, rows: Tensor, mask: Tensor) -> Tensor:
        """h~ from h and the memories at bank ``rows`` (``[B, K]``, ``mask`` True = a real one)."""
        return self.ram(h, *self.retriever.gather(rows, mask, self.device))

    def _show_progress(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.is_global_zero and trainer.progress_bar_callback is not None

    def user_representation(self, batch: SequenceBatch) -> Tensor:
        h, rows = self.retriever.queries(batch, self.training, self.device)
        return self.augment(h, batch["user"], batch["end"], bank_rows=rows, input_ids=batch["input_ids"])

    def item_weights(self) -> Tensor:
        return self.encoder.item_weights()

    # ---------------------------------------------------------------- training
    def training_step(self, batch: SequenceBatch, batch_idx: int) -> Tensor | None:
        h_tilde = self.user_representation(batch)
        loss = next_item_loss(h_tilde, self.item_weights(), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["target"].size(0))
        if not loss.requires_grad:  # alpha = 1 or K = 0: h~ = h, nothing to train
            return None
        return loss

    def optimized_parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.ram.parameters()  # the encoder and the item table stay frozen

    # ---------------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        residual = holds_residual_block(k for k in checkpoint.get("state_dict", {}) if k.startswith("ram."))
        if residual != self.ram.residual:
            raise CheckpointError(f"the checkpoint's RAM block (residual={residual}) does not match "
                                  f"ram.residual={self.ram.residual}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The frozen encoder travels with the RAFT checkpoint: it can be re-used as
        # encoder_checkpoint and load_encoder() reads it. The faiss index is not stored.
        checkpoint[RECORD_KEY] = encoder_record(self.encoder, self.encoder_data)
        # Which RAFT module wrote it (a subclass may search its bank differently), for load_raft.
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    @property
    def bank_callback(self) -> MemoryBankCallback | None:
        return self._bank_callback


__all__ = ["RAFTModule"]
