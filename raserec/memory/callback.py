"""Lightning glue for the memory bank: build it when a stage needs it, rebuild it exactly when the
reference set (or the encoder) changes."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import lightning as L

from raserec.checkpoint import state_fingerprint
from raserec.data.batch import PairDataset
from raserec.errors import CheckpointError, RaserecError
from raserec.memory.bank import IndexConfig, MemoryBank

log = logging.getLogger(__name__)

BankStage = Literal["fit", "test", "predict"]


class MemoryBankCallback(L.Callback):
    """Builds ``pl_module.memory_bank`` from ``datamodule.reference_pairs(stage)`` encoded by
    ``pl_module.encoder`` (frozen), before fitting, validating, testing and predicting.

    The reference set depends on the stage: fit and validate use the training pairs; test adds
    the validation pairs and predict also the test pairs (the dynamic memory bank). The bank
    is rebuilt whenever ``datamodule.reference_version(stage)`` or the encoder's weights differ
    from what the current bank was built from, and never otherwise (``num_builds`` counts builds).

    DDP: every rank builds the identical bank (same frozen encoder, same reference pairs, k-means
    seeded by :attr:`IndexConfig.seed`), so no index has to be broadcast or pickled; the price is
    the build time (seconds) on every rank. With ``save_dir`` only global rank 0 writes.

    Args:
        config: faiss index settings.
        batch_size: encoding batch size.
        save_dir: if set, banks are saved under ``save_dir/<reference_version>`` after building,
            and a saved bank whose encoder fingerprint and reference version match is loaded
            instead of rebuilt (a stale one is rebuilt and overwritten, never used).
        progress: show a progress bar while encoding.
        attribute: name of the module attribute the bank is attached to.
        encoder_attribute: name of the module attribute holding the frozen encoder whose h the
            bank stores (RAFT: ``encoder``; Ada-Retrieval + RAM: ``memory_encoder``).
    """

    def __init__(self, config: IndexConfig | None = None, batch_size: int = 2048, save_dir: str | Path | None = None,
                 progress: bool = True, attribute: str = "memory_bank", encoder_attribute: str = "encoder") -> None:
        self.config = config or IndexConfig()
        self.batch_size = batch_size
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.progress = progress
        self.attribute = attribute
        self.encoder_attribute = encoder_attribute
        self.num_builds = 0
        self.num_loads = 0
        self.history: list[tuple[str, str, str]] = []  # (stage, reference_version, "built" | "loaded")

    # ---------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ensure(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation queries must never see validation pairs: always the "fit" reference set.
        self.ensure(trainer, pl_module, "fit")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ensure(trainer, pl_module, "test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ensure(trainer, pl_module, "predict")

    # ---------------------------------------------------------------- logic
    def ensure(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: BankStage) -> MemoryBank:
        """Return the module's bank for ``stage``, building (or loading) it if it is missing or stale."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "reference_version"):
            raise RaserecError("the memory bank needs a SequenceDataModule (trainer.datamodule has no reference set)")
        encoder = getattr(pl_module, self.encoder_attribute)
        version = dm.reference_version(stage)
        fingerprint = state_fingerprint(encoder)
        bank: MemoryBank | None = getattr(pl_module, self.attribute, None)
        if bank is not None and bank.reference_version == version and bank.encoder_fingerprint == fingerprint:
            return bank
        bank = self._load_saved(version, fingerprint)
        if bank is None:
            pairs = dm.reference_pairs(stage)
            data = dm.data
            dataset = PairDataset(pairs, data.offsets, data.items, dm.max_len)
            start = time.perf_counter()
            bank = MemoryBank.build(encoder, dataset, self.config, batch_size=self.batch_size,
                                    device=pl_module.device, progress=self.progress and trainer.is_global_zero,
                                    reference_version=version)
            seconds = time.perf_counter() - start
            self.num_builds += 1
            self.history.append((stage, version, "built"))
            log.info("memory bank (%s): built %d entries, index %s (nlist %d, nprobe %d) in %.1f s",
                     stage, len(bank), bank.kind, bank.nlist, bank.nprobe, seconds)
            if trainer.logger is not None:
                trainer.logger.log_metrics({"memory_bank/build_seconds": seconds, "memory_bank/size": len(bank)},
                                           step=trainer.global_step)
            if self.save_dir is not None:
                if trainer.is_global_zero:
                    bank.save(self.save_dir / version)
                trainer.strategy.barrier("memory_bank_saved")
        setattr(pl_module, self.attribute, bank)
        return bank

    def _load_saved(self, version: str, fingerprint: str) -> MemoryBank | None:
        if self.save_dir is None or not (self.save_dir / version / "manifest.json").is_file():
            return None
        directory = self.save_dir / version
        try:
            bank = MemoryBank.load(directory, expected_encoder=fingerprint, expected_reference_version=version)
        except CheckpointError as exc:
            log.warning("%s; rebuilding it", exc)
            return None
        self.num_loads += 1
        self.history.append(("", version, "loaded"))
        log.info("memory bank: loaded %d entries from %s", len(bank), directory)
        return bank
