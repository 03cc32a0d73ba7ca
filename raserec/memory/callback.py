"""Lightning glue for the memory bank: build it when a stage needs it, rebuild it exactly when the
reference set (or the encoder) changes."""

from __future__ import annotations

import lightning as L

from raserec.errors import RaserecError
from raserec.memory.bank import MemoryBank
from raserec.memory.retriever import BankStage, MemoryRetriever


class MemoryBankCallback(L.Callback):
    """Keeps ``retriever``'s bank current: before fitting, validating, testing and predicting it
    calls :meth:`MemoryRetriever.ensure` with the datamodule's reference set for the stage.

    The reference set depends on the stage: fit and validate use the training pairs; test adds
    the validation pairs and predict also the test pairs (the dynamic memory bank). The bank is
    rebuilt whenever ``datamodule.reference_version(stage)`` or the key encoder's weights differ
    from what the current bank was built from, and never otherwise (``retriever.num_builds``
    counts builds).

    DDP: every rank builds the identical bank (same frozen encoder, same reference pairs, k-means
    seeded by :attr:`IndexConfig.seed`), so no index has to be broadcast or pickled; the price is
    the build time (seconds) on every rank. With ``save_dir`` only global rank 0 writes.

    Args:
        retriever: the component whose bank this callback maintains.
        progress: show a progress bar while encoding (only when the trainer shows one).
    """

    def __init__(self, retriever: MemoryRetriever, progress: bool = True) -> None:
        self.retriever = retriever
        self.progress = progress

    @property
    def num_builds(self) -> int:
        return self.retriever.num_builds

    @property
    def num_loads(self) -> int:
        return self.retriever.num_loads

    @property
    def history(self) -> list[tuple[str, str, str]]:
        return self.retriever.history

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
        """The retriever's bank for ``stage``, built (or loaded) if it is missing or stale."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "reference_version"):
            raise RaserecError("the memory bank needs a SequenceDataModule (trainer.datamodule has no reference set)")
        bank, what = self.retriever.ensure(dm, stage, device=pl_module.device,
                                           progress=self.progress and trainer.is_global_zero
                                           and trainer.progress_bar_callback is not None,
                                           writer=trainer.is_global_zero)
        if what == "built":
            if trainer.logger is not None:
                trainer.logger.log_metrics({"memory_bank/build_seconds": self.retriever.last_build_seconds,
                                            "memory_bank/size": len(bank)}, step=trainer.global_step)
            if self.retriever.save_dir is not None:
                trainer.strategy.barrier("memory_bank_saved")
        return bank
