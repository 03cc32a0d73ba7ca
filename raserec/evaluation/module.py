"""Shared evaluation for every recommender LightningModule: full ranking, per-stage metrics,
and top-N prediction. Subclasses only say how a batch becomes a user representation."""

from __future__ import annotations

import functools
import random
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
from torch import Tensor

from raserec.data.batch import SequenceBatch
from raserec.errors import ConfigError, TrainingError, check_optimizer
from raserec.evaluation.metrics import QueryRanks, RankingMetrics
from raserec.evaluation.ranking import product_ranks, top_items


def rng_states() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python RNG states as plain types (loadable with
    ``weights_only=True``). Without the CUDA states a resumed GPU run would draw other dropout
    masks than an uninterrupted one."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore :func:`rng_states`. CUDA states are restored when the run has as many devices as
    the states (a GPU checkpoint resumed on a CPU, or a checkpoint from before they were saved,
    keeps the current CUDA states)."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


Step = TypeVar("Step", bound=Callable[..., Any])


def full_precision(step: Step) -> Step:
    """Run an evaluation or prediction step in float32 even under mixed precision
    (``trainer.precision: bf16-mixed``). Training may use bf16 products; ranking must not: bf16
    scores keep about 3 significant digits, so many items would tie with the target (ranked
    pessimistically) and the metrics would drop for a reason that is not the model."""

    @functools.wraps(step)
    def wrapper(self: L.LightningModule, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device.type, enabled=False):
            return step(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_fits_data(module: L.LightningModule, datamodule: Any) -> None:
    """Raise :class:`ConfigError` when the data's sequences are longer than ``module.encoder`` reads."""
    limit = getattr(getattr(module, "encoder", None), "max_len", None)
    if datamodule is not None and isinstance(limit, int) and getattr(datamodule, "max_len", 0) > limit:
        raise ConfigError(f"data.max_len {datamodule.max_len} exceeds the encoder's max_len {limit}: set them equal "
                          f"(or data.max_len lower)")


class RecommenderModule(L.LightningModule):
    """Validation/test/predict steps shared by pre-training and fine-tuning.

    Also owns the optimiser settings every module shares: Adam with ``lr`` and ``weight_decay``
    over :meth:`optimized_parameters` (checked here, once, before any file is read).

    Args:
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        metric_ks: cut-offs of HR@K and NDCG@K.
        mask_history: exclude items already in the input sequence from the ranking (off in the
            paper's protocol; the target itself is never excluded).
        predict_top_n: how many items ``predict`` returns per user.
    """

    def __init__(self, *, lr: float = 1e-3, weight_decay: float = 0.0, metric_ks: Sequence[int] = (5, 10, 20, 50),
                 mask_history: bool = False, predict_top_n: int = 10) -> None:
        super().__init__()
        check_optimizer(lr, weight_decay)
        self.lr = lr
        self.weight_decay = weight_decay
        self._shared_settings = {"lr": lr, "weight_decay": weight_decay, "metric_ks": metric_ks,
                                 "mask_history": mask_history, "predict_top_n": predict_top_n}
        self.mask_history = mask_history
        self.predict_top_n = predict_top_n
        self.val_metrics = RankingMetrics(metric_ks)
        self.test_metrics = RankingMetrics(metric_ks)
        # Per-query test ranks (for paired tests between models); read by the results writer
        # as ``test_query_ranks`` after the test pass.
        self.test_ranks = QueryRanks()
        self.test_query_ranks: tuple[np.ndarray, np.ndarray] | None = None

    def save_shared_hyperparameters(self) -> None:
        """Put the shared settings into ``hparams`` (call after ``save_hyperparameters``). A module
        that forwards them as ``**kwargs`` gets from Lightning only those its caller passed; the
        checkpoint must hold all of them, so it rebuilds the same module if a default changes."""
        self.hparams.update(self._shared_settings)

    def optimized_parameters(self) -> Iterable[torch.nn.Parameter]:
        """What the optimiser trains (all parameters unless a module freezes a part); the order
        is the optimiser state's order in checkpoints, so overrides must keep it stable."""
        return self.parameters()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # foreach: one multi-tensor kernel per Adam step instead of a loop over the parameters (on
        # CPU the loop is the default); the same update bit for bit, 4x faster (7.7 -> 1.9 ms per
        # SASRec step on 2 cores; fused would be faster still but not bit-identical).
        return torch.optim.Adam(self.optimized_parameters(), lr=self.lr, weight_decay=self.weight_decay, foreach=True)

    @abstractmethod
    def user_representation(self, batch: SequenceBatch) -> Tensor:
        """Representation used for ranking, ``[B, d]``, in eval mode."""

    @abstractmethod
    def item_weights(self) -> Tensor:
        """Candidate item embeddings, rows 1..N: ``[N, d]``."""

    def scores(self, batch: SequenceBatch) -> Tensor:
        return self.user_representation(batch) @ self.item_weights().T  # the one scoring product

    def setup(self, stage: str) -> None:
        """Refuse data whose sequences are longer than the encoder can read (``data.max_len``
        and the encoder's ``max_len`` are set separately), before any training or evaluation."""
        check_fits_data(self, getattr(self.trainer, "datamodule", None) if self._trainer is not None else None)

    def on_before_backward(self, loss: Tensor) -> None:
        # A NaN/inf loss would train garbage for hours and end in an unrelated error: stop here.
        if not bool(torch.isfinite(loss.detach())):
            raise TrainingError(f"the training loss became {float(loss)} at epoch {self.current_epoch}, "
                                f"step {self.global_step}; lower the learning rate or check the settings "
                                "(temperature, lambda) and the data")

    def _history(self, batch: SequenceBatch) -> Tensor | None:
        return batch["input_ids"] if self.mask_history else None

    def _eval_step(self, batch: SequenceBatch, metrics: RankingMetrics) -> Tensor:
        # The same ranks as target_ranks(self.scores(batch), ...), scored a few rows at a time.
        ranks = product_ranks(self.user_representation(batch), self.item_weights(), batch["target"],
                              self._history(batch))
        metrics.update(ranks)
        return ranks

    @full_precision
    def validation_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    @full_precision
    def test_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        self.test_ranks.update(batch["index"], self._eval_step(batch, self.test_metrics))

    def _log_metrics(self, metrics: RankingMetrics, prefix: str) -> None:
        values = metrics.compute()  # already reduced across processes by torchmetrics
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, sync_dist=False, rank_zero_only=False)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")
        # Every process enters the gather, also one whose share of the queries was empty (its
        # states are empty: torchmetrics warns that update was never called).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before the .*update", category=UserWarning)
            rows, ranks = self.test_ranks.compute()
        self.test_query_ranks = (rows.cpu().numpy(), ranks.cpu().numpy()) if rows.numel() else None
        self.test_ranks.reset()

    # Resuming must continue the same random streams (data order, dropout), not fresh ones.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    @full_precision
    def predict_step(self, batch: SequenceBatch, batch_idx: int) -> dict[str, Tensor]:
        top = top_items(self.scores(batch), self.predict_top_n, self._history(batch))
        return {"user": batch["user"], "items": top}
