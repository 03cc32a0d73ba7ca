"""One log line per validated epoch of a fit, for runs without a progress bar (background runs,
``--trainer.enable_progress_bar false``): the epoch, the validation metrics, the best so far and
how many epochs ago it was (against early stopping's patience), and the epoch's wall time."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class EpochLog(L.Callback):
    """Logs ``epoch 12/100: val/HR@10 0.1012 (best 0.1020 at epoch 10, 2 of patience 10), val/NDCG@10
    0.0503, train/loss 7.4210, 61 s`` (the other validation metrics at the monitor's cutoff; the
    loss of the epoch's last step). Stateful: a resumed fit keeps its best.

    Args:
        monitor: the metric whose best is reported (early stopping's and the checkpoint's).
        mode: ``max`` or ``min``.
    """

    def __init__(self, monitor: str = "val/HR@10", mode: str = "max") -> None:
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._epoch_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A fit resumed from a checkpoint written without this callback's state: the best score
        # the checkpoint callback restored (its epoch is unknown).
        ckpt = trainer.checkpoint_callback
        score = getattr(ckpt, "best_model_score", None)
        if self.best is None and score is not None and getattr(ckpt, "monitor", None) == self.monitor:
            self.best = float(score)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # under DDP one line per epoch, not one per process
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        epoch = trainer.current_epoch + 1
        parts = []
        value = metrics.get(self.monitor)
        if value is not None and not math.isnan(value):
            better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
            if better:
                self.best, self.best_epoch = value, epoch
            if self.best_epoch is None:
                parts.append(f"{self.monitor} {value:.4f} (best {self.best:.4f}, before the resume)")
            else:
                stopper = trainer.early_stopping_callback
                since = f"{epoch - self.best_epoch}" + (f" of patience {stopper.patience}" if stopper is not None
                                                         else " epochs ago")
                parts.append(f"{self.monitor} {value:.4f} (best {self.best:.4f} at epoch {self.best_epoch}, {since})")
        # the other validation metrics at the monitor's cutoff (e.g. val/NDCG@10 beside val/HR@10)
        cutoff = self.monitor[self.monitor.rfind("@"):] if "@" in self.monitor else None
        parts += [f"{k} {v:.4f}" for k, v in sorted(metrics.items())
                  if k.startswith("val/") and k != self.monitor and cutoff is not None and k.endswith(cutoff)]
        if "train/loss" in metrics:
            parts.append(f"train/loss {metrics['train/loss']:.4f}")
        if self._epoch_start is not None:
            parts.append(f"{time.perf_counter() - self._epoch_start:.0f} s")
        log.info("epoch %d/%s: %s", epoch, trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?",
                 ", ".join(parts))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch = state_dict.get("best"), state_dict.get("best_epoch")
