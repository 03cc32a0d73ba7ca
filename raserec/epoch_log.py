"""One log line per validated epoch of a fit, for runs without a progress bar (background runs,
``--trainer.enable_progress_bar false``): the epoch, the validation metrics, the best so far and
how many epochs ago it was (early stopping's own state), and the epoch's wall time."""

from __future__ import annotations

import logging
import math
import time

import lightning as L

log = logging.getLogger(__name__)


class EpochLog(L.Callback):
    """Logs ``epoch 12/100: val/HR@10 0.1012 (best 0.1020 at epoch 10, 2 of patience 10), val/NDCG@10
    0.0503, train/loss 7.4210, 61 s`` for each training epoch that validated (the other validation
    metrics at the monitor's cutoff; the loss of the epoch's last step).

    The best and the epochs since come from the trainer's early-stopping callback (restored on
    resume, so this callback keeps no state and adds nothing to checkpoints). Lightning runs the
    monitoring callbacks' epoch-end hooks after every other callback's, so the line is written
    once early stopping has judged the epoch: when the next epoch starts, or the fit ends.
    """

    def __init__(self) -> None:
        self._epoch_start: float | None = None
        self._validated = False
        self._pending: tuple[int, dict[str, float], float | None] | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)
        self._epoch_start = time.perf_counter()
        self._validated = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validated and trainer.is_global_zero:  # under DDP one line per epoch, not one per process
            seconds = None if self._epoch_start is None else time.perf_counter() - self._epoch_start
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            self._pending = (trainer.current_epoch + 1, metrics, seconds)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: L.Trainer) -> None:
        if self._pending is None:
            return
        epoch, metrics, seconds = self._pending
        self._pending = None
        stopper = trainer.early_stopping_callback
        monitor = stopper.monitor if stopper is not None else "val/HR@10"
        parts = []
        if monitor in metrics:
            text = f"{monitor} {metrics[monitor]:.4f}"
            best = float(stopper.best_score) if stopper is not None else math.inf
            if math.isfinite(best):
                # wait_count counts validations, one every check_val_every_n_epoch epochs
                every = trainer.check_val_every_n_epoch or 1
                text += (f" (best {best:.4f} at epoch {epoch - stopper.wait_count * every}, "
                         f"{stopper.wait_count} of patience {stopper.patience})")
            parts.append(text)
        # the other validation metrics at the monitor's cutoff (e.g. val/NDCG@10 beside val/HR@10)
        cutoff = monitor[monitor.rfind("@"):] if "@" in monitor else None
        parts += [f"{k} {v:.4f}" for k, v in sorted(metrics.items())
                  if k.startswith("val/") and k != monitor and cutoff is not None and k.endswith(cutoff)]
        if "train/loss" in metrics:
            parts.append(f"train/loss {metrics['train/loss']:.4f}")
        if seconds is not None:
            parts.append(f"{seconds:.0f} s")
        log.info("epoch %d/%s: %s", epoch, trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?",
                 ", ".join(parts))
