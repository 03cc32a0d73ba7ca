"""Stage 2: retrieval-augmented fine-tuning (RAFT). The pre-trained encoder and item embeddings
are frozen; only RAM learns to combine h with K memories retrieved from the memory bank."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor

from raserec.checkpoint import (
    RECORD_KEY,
    check_same_data,
    encoder_record,
    load_encoder_for,
    trust_encoder_module,
)
from raserec.data.batch import SequenceBatch
from raserec.errors import CheckpointError, ConfigError, RaserecError, check, check_optimizer
from raserec.evaluation.module import RecommenderModule
from raserec.finetune.ram import RetrievalAugmentedModule, holds_residual_block
from raserec.memory.bank import IndexConfig, MemoryBank
from raserec.memory.callback import MemoryBankCallback
from raserec.models.losses import next_item_loss

log = logging.getLogger(__name__)


class RAFTModule(RecommenderModule):
    """RaSeRec's second stage: frozen encoder + memory bank + trainable RAM.

    The memory bank is built by a :class:`MemoryBankCallback` that this module adds itself
    (``configure_callbacks``), before fit, validate, test and predict; it is not part of the
    checkpoint (it is rebuilt from the frozen encoder and the data, or loaded from
    ``bank_save_dir``). RAFT checkpoints embed the encoder record, so they can also serve as an
    ``encoder_checkpoint``.

    Args:
        num_items: number of real items (linked from the datamodule by the CLI); must equal the
            checkpoint's.
        encoder_checkpoint: pre-training ``.ckpt`` (or a file from ``save_encoder``).
        k: memories retrieved per query (K).
        alpha: weight of h in h~ (1 = the pre-trained model).
        beta: weight of channel 1 (h_k -> v_k) against channel 2 (v_k -> h_k).
        ram_depth: cross-attention layers per RAM channel.
        num_heads: RAM attention heads.
        inner_size: RAM feed-forward inner size.
        dropout: RAM dropout.
        index: faiss index kind of the memory bank.
        nlist: IVF lists.
        nprobe: IVF lists probed per query.
        overfetch: candidates fetched before the leakage filter: ``null`` = exactly K plus the
            query's own dropped entries (same neighbours as any larger over-fetch, fastest);
            an int m = the authors' fixed m * K (they use 4).
        pq_m: ``ivf_pq`` sub-quantizers.
        bank_batch_size: encoding batch size when building the bank.
        bank_save_dir: save built banks here and reuse matching ones (``null``: keep in memory).
        reuse_bank_h: during training take a query's h from the bank's payload (the encoder is
            frozen and in eval mode, so it is the same vector) instead of re-encoding it.
        precompute_retrieval: with ``reuse_bank_h``, search the memories of every training query
            once per bank build (:meth:`MemoryBank.self_neighbours`) instead of once per batch;
            the same rows, so the same training, several times faster.
        ram_residual: wrap every RAM cross-attention in a residual connection + LayerNorm (this
            project's earlier block, an ablation; the authors' block has neither).
        trusted_encoder_modules: module prefixes (e.g. ``mypkg.encoders.``) whose classes an encoder
            record may name, beside raserec's own encoders (records naming anything else are refused).
        ram_init_std: ``null`` keeps PyTorch's default initialisation of the RAM (the authors');
            a float applies RecBole's normal(0, std) (the earlier block used 0.02).
        lr: Adam learning rate (RAM parameters only).
        weight_decay: Adam weight decay.
        allow_other_data: use the encoder even with data other than it was pre-trained on (same
            item count, different content hash); refused by default, since item ids would
            silently mean other items.
        metric_ks: cut-offs of HR@K and NDCG@K.
        mask_history: exclude already-seen items from the ranking.
        predict_top_n: items per user written by ``raserec predict``.
    """

    def __init__(
        self,
        num_items: int | None = None,
        *,
        encoder_checkpoint: str,
        k: int = 20,
        alpha: float = 0.5,
        beta: float = 1.0,
        ram_depth: int = 2,
        num_heads: int = 2,
        inner_size: int = 256,
        dropout: float = 0.5,
        index: Literal["ivf_flat", "flat", "ivf_pq"] = "ivf_flat",
        nlist: int = 128,
        nprobe: int = 1,
        overfetch: int | None = None,
        pq_m: int = 8,
        bank_batch_size: int = 2048,
        bank_save_dir: str | None = None,
        reuse_bank_h: bool = True,
        precompute_retrieval: bool = True,
        ram_residual: bool = False,
        ram_init_std: float | None = None,
        trusted_encoder_modules: Sequence[str] = (),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        allow_other_data: bool = False,
        metric_ks: Sequence[int] = (5, 10, 20, 50),
        mask_history: bool = False,
        predict_top_n: int = 10,
    ) -> None:
        super().__init__(metric_ks=metric_ks, mask_history=mask_history, predict_top_n=predict_top_n)
        check_optimizer(lr, weight_decay)
        check(bank_batch_size >= 1, f"bank_batch_size must be >= 1, got {bank_batch_size}")
        check(0.0 <= alpha <= 1.0 and 0.0 <= beta <= 1.0, f"alpha and beta must lie in [0, 1], got alpha={alpha}, "
                                                          f"beta={beta}")
        check(0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}")
        if k < 0:
            raise ConfigError(f"k must be >= 0, got {k}")
        self.save_hyperparameters()
        for prefix in trusted_encoder_modules:
            trust_encoder_module(prefix)
        encoder, data_fingerprint = load_encoder_for(encoder_checkpoint, num_items)
        # Frozen: no gradients, and eval mode forever (see train()), so its dropout stays off
        # and the bank's keys stay valid.
        encoder.requires_grad_(False)
        encoder.eval()
        self.encoder = encoder
        self.encoder_data = data_fingerprint
        self.ram = RetrievalAugmentedModule(encoder.hidden_size, alpha=alpha, beta=beta, depth=ram_depth,
                                            num_heads=num_heads, inner_size=inner_size, dropout=dropout,
                                            residual=ram_residual, init_std=ram_init_std)
        self.k = k
        self.lr = lr
        self.weight_decay = weight_decay
        self.reuse_bank_h = reuse_bank_h
        self.precompute_retrieval = precompute_retrieval
        self.bank_config = IndexConfig(kind=index, nlist=nlist, nprobe=nprobe, overfetch=overfetch, pq_m=pq_m)
        self.memory_bank: MemoryBank | None = None
        self.retrieval_seconds = 0.0  # time of the last search + filter + gather (for benchmarks)
        self._bank_callback: MemoryBankCallback | None = None
        self._warned_small_bank = False

    # ---------------------------------------------------------------- frozen encoder
    def train(self, mode: bool = True) -> RAFTModule:
        super().train(mode)
        self.encoder.eval()  # Lightning calls train() every epoch: keep the encoder's dropout off
        return self

    @property
    def uses_retrieval(self) -> bool:
        return self.k > 0 and self.ram.alpha < 1.0

    def configure_callbacks(self) -> list[L.Callback]:
        # One instance for the module's lifetime, so its build counter spans fit and test.
        if self._bank_callback is None:
            self._bank_callback = MemoryBankCallback(
                self.bank_config, batch_size=self.hparams.bank_batch_size, save_dir=self.hparams.bank_save_dir)
        return [self._bank_callback]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_same_data(self.encoder_data, getattr(self.trainer, "datamodule", None),
                        self.hparams.get("allow_other_data", False))

    # ---------------------------------------------------------------- forward
    def _bank(self) -> MemoryBank:
        if self.memory_bank is None:
            raise RaserecError("RAFTModule has no memory bank: run it through a Trainer (its MemoryBankCallback "
                               "builds one) or assign module.memory_bank")
        return self.memory_bank

    def query_representation(self, batch: SequenceBatch, rows: np.ndarray | None = None) -> Tensor:
        """h of the batch's prefixes from the frozen encoder, or from the bank's payload when the
        batch's pairs are the bank's entries ``rows`` (see ``reuse_bank_h`` and :meth:`_bank_rows`)."""
        if rows is not None:
            return torch.from_numpy(self._bank().h[rows]).to(self.device)
        with torch.no_grad():
            return self.encoder(batch["input_ids"])

    def _bank_rows(self, batch: SequenceBatch) -> np.ndarray | None:
        """While training with ``reuse_bank_h``: the bank rows of the batch's pairs, if the bank
        holds exactly these pairs at these rows (the fit bank stores the training pairs in their
        dataset order); else ``None``."""
        if not (self.training and self.reuse_bank_h and self.memory_bank is not None):
            return None
        bank = self._bank()
        rows = batch["index"].cpu().numpy()
        if len(rows) == 0 or rows.max() >= len(bank):
            return None
        if not (np.array_equal(bank.users[rows], batch["user"].cpu().numpy())
                and np.array_equal(bank.ends[rows], batch["end"].cpu().numpy())):
            return None
        return rows

    def augment(self, h: Tensor, user: Tensor, end: Tensor, bank_rows: np.ndarray | None = None) -> Tensor:
        """h~: retrieve K memories for each query (no leakage) and combine them with RAM.
        ``bank_rows``: the queries are these bank entries, whose memories are searched once per
        bank build (``precompute_retrieval``)."""
        if not self.uses_retrieval:
            return h
        start = time.perf_counter()
        bank = self._bank()
        if self.k > len(bank) and not self._warned_small_bank:
            self._warned_small_bank = True
            log.warning("k = %d memories per query, but the memory bank holds only %d entries: queries get at most "
                        "%d (the rest are masked)", self.k, len(bank), len(bank))
        if bank_rows is not None and self.precompute_retrieval:
            all_rows, all_mask = bank.self_neighbours(self.k, progress=self._show_progress())
            rows, mask = torch.from_numpy(all_rows[bank_rows]), torch.from_numpy(all_mask[bank_rows])
        else:
            rows, mask = bank.search(h, user, end, self.k)
        self.retrieval_seconds = time.perf_counter() - start
        return self.mix(h, rows, mask)

    def mix(self, h: Tensor, rows: Tensor, mask: Tensor) -> Tensor:
        """h~ from h and the memories at bank ``rows`` (``[B, K]``, ``mask`` True = a real one):
        their stored h_k and the frozen embeddings of their target items, combined by RAM."""
        h_k, targets = self._bank().gather(rows, mask)
        h_k, targets, mask = h_k.to(self.device), targets.to(self.device), mask.to(self.device)
        return self.ram(h, h_k, self.encoder.item_embedding(targets), mask)

    def _show_progress(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.is_global_zero and trainer.progress_bar_callback is not None

    def user_representation(self, batch: SequenceBatch) -> Tensor:
        rows = self._bank_rows(batch)
        return self.augment(self.query_representation(batch, rows), batch["user"], batch["end"], bank_rows=rows)

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.ram.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # ---------------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        residual = holds_residual_block(k for k in checkpoint.get("state_dict", {}) if k.startswith("ram."))
        if residual != self.ram.residual:
            if "ram_residual" in checkpoint.get("hyper_parameters", {}):
                raise CheckpointError(f"the checkpoint's RAM block (residual={residual}) does not match "
                                      f"ram_residual={self.ram.residual}")
            # Written before ram_residual existed: it holds the residual block; rebuild to load it.
            hp = self.hparams
            self.ram = RetrievalAugmentedModule(self.encoder.hidden_size, alpha=hp.alpha, beta=hp.beta,
                                                depth=hp.ram_depth, num_heads=hp.num_heads, inner_size=hp.inner_size,
                                                dropout=hp.dropout, residual=residual)
            self.hparams.ram_residual = residual

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The frozen encoder travels with the RAFT checkpoint: it can be re-used as
        # encoder_checkpoint and load_encoder() reads it. The faiss index is not stored.
        checkpoint[RECORD_KEY] = encoder_record(self.encoder, self.encoder_data)

    @property
    def bank_callback(self) -> MemoryBankCallback | None:
        return self._bank_callback


__all__ = ["RAFTModule"]
