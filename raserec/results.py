"""Results files (``results/NAME.json``): every figure the project claims, with its provenance."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from raserec.outputs import check_output_file, replacing


def hardware() -> str:
    """CPU model and core count, plus the GPU model when one is used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})"
    if torch.cuda.is_available():
        desc += f"; GPU {torch.cuda.get_device_name(0)}"
    return desc


def command_line() -> str:
    prog = Path(sys.argv[0]).name
    if prog in ("__main__.py", "cli.py"):
        prog = "raserec"
    return shlex.join([prog, *sys.argv[1:]])


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def schedule(trainer: L.Trainer, first_epoch: int = 0) -> str:
    """How the fit that just ended stopped, in words, so that no record can pass a capped run off
    as a converged one. Converged means early stopping ran out of patience at the last epoch of
    this fit (``first_epoch``: where a resumed fit started; a stop restored from an earlier fit,
    or one overruled by ``min_epochs``, does not count). Everything else is named: another early
    stopping reason (non-finite metric, thresholds), or a cap by ``max_steps``, ``max_time`` or
    ``max_epochs`` (labelled "not converged")."""
    epochs = trainer.current_epoch
    es = trainer.early_stopping_callback
    stopped_here = es is not None and first_epoch <= es.stopped_epoch == epochs - 1 and es.stopped_epoch > 0
    if stopped_here:
        reason = getattr(es, "stopping_reason", EarlyStoppingReason.PATIENCE_EXHAUSTED)
        if reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            return (f"converged: early stopping on {es.monitor} (patience {es.patience}) "
                    f"ended the fit after {epochs} epochs")
        return f"stopped by early stopping ({reason.name.lower()}) after {epochs} epochs: not converged"
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return f"capped at max_steps {trainer.max_steps} ({epochs} epochs): not converged"
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
        return f"time-capped after {epochs} epochs (max_time): not converged"
    if trainer.max_epochs is not None and trainer.max_epochs >= 0 and epochs >= trainer.max_epochs:
        return f"capped at max_epochs {trainer.max_epochs}: not converged" + (
            "" if es is not None else " (no early stopping)")
    return f"fit ended after {epochs} epochs: not converged"


def write_results(path: str | Path, record: dict[str, Any]) -> Path:
    path = Path(path)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


class ResultsWriter(L.Callback):
    """Writes ``results/NAME.json`` after testing: command, hardware, dataset, model, seed,
    wall time (from the start of the run) and the test metrics (plus the validation curve).

    Args:
        path: output file, e.g. ``results/beauty_sasrec.json``.
        dataset: dataset name recorded in the file.
        model: model name recorded in the file.
        notes: free text (schedule, deviations from the paper).
        config: the resolved configuration of the run, stored beside the figures.
        ranks: also write each test query's target rank to :func:`ranks_path` (``NAME.ranks_test.npz``:
            ``row``, ``user``, ``end``, ``target``, ``rank``), for paired tests (``raserec compare``).
    """

    def __init__(self, path: str, dataset: str, model: str, notes: str = "",
                 config: dict[str, Any] | None = None, ranks: bool = True) -> None:
        check_output_file(path, "results file", (".json",))
        self.config = config
        self.ranks = ranks
        self.path = path
        self.dataset = dataset
        self.model = model
        self.notes = notes
        self._start = time.perf_counter()
        self._curve: list[dict[str, float]] = []
        self._fit_time: float | None = None
        self._schedule = ""  # how the fit ended (set at fit end; empty for a test-only run)
        self._first_epoch = 0  # where this fit started (set once the checkpoint is restored)
        # Which machine ran which epochs: a run resumed elsewhere (a carried checkpoint) records
        # every machine, not only the one that happened to finish it.
        self._segments: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, applied once fitting resumes

    # on_validation_end runs after the module's epoch-end hook has logged this epoch's metrics.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if m:
            self._curve.append({"epoch": trainer.current_epoch + 1, **m})
        self._end_segment_at(trainer.current_epoch + 1)

    # Runs before the checkpoint callbacks (Lightning calls those last), so a saved state counts the epoch.
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_segment_at(trainer.current_epoch + 1)

    def _end_segment_at(self, epoch: int) -> None:
        if self._segments:
            self._segments[-1]["last_epoch"] = epoch

    # Stateful, so a run resumed with --ckpt_path keeps its curve and counts its earlier time.
    def state_dict(self) -> dict[str, Any]:
        return {"curve": list(self._curve), "elapsed_s": time.perf_counter() - self._start,
                "segments": [dict(seg) for seg in self._segments]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied only when fitting resumes: testing a checkpoint (e.g. the best one after fit)
        # restores callback states too, and must not rewind this run's curve and clock.
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch if trainer is not None else 0  # epochs restored from a checkpoint
        self._first_epoch = done  # here, not in on_fit_start: that runs before the checkpoint is restored
        done = self._resume(done)
        if trainer is not None:
            self._segments.append({"hardware": hardware(), "first_epoch": done + 1, "last_epoch": done})

    def _resume(self, done: int) -> int:
        """Apply a checkpoint's state (if this fit resumed one); returns the epochs it recorded."""
        state = self._pending
        if state is None:
            return done
        self._pending = None
        self._curve = list(state["curve"])
        self._start = time.perf_counter() - float(state["elapsed_s"])
        self._segments = [dict(seg) for seg in state.get("segments", [])]
        recorded = self._segments[-1]["last_epoch"] if self._segments else 0
        if done > recorded:  # a checkpoint from before machines were recorded
            self._segments.append({"hardware": None, "first_epoch": recorded + 1, "last_epoch": done})
        # a checkpoint saved at validation end has counted an epoch the restored loop may not have yet
        return max(done, recorded)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed fit that had nothing left to train never reached on_train_start: its record
        # is still the checkpoint's (and so is how it ended: an early stop restored with it counts).
        if self._pending is not None:
            self._resume(trainer.current_epoch)
        self._fit_time = time.perf_counter() - self._start
        self._schedule = schedule(trainer, self._first_epoch)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(("test/", "base/test/"))}
        # One run, one seed: no `_std` keys (they appear only in summaries over several seeds).
        seed = os.environ.get("PL_GLOBAL_SEED")
        record = {
            "command": command_line(),
            "hardware": hardware_of(self._segments),
            "dataset": self.dataset,
            "model": self.model,
            "model_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",  # what actually ran
            "seeds": [int(seed)] if seed is not None else [],
            "wall_time_s": round(time.perf_counter() - self._start, 2),
            "fit_time_s": None if self._fit_time is None else round(self._fit_time, 2),
            "epochs": trainer.current_epoch,
            "precision": str(trainer.precision),  # training precision; evaluation always runs float32
            "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None) or None,
            "git_commit": git_commit(),
            "notes": "; ".join(n for n in (self.notes, self._schedule) if n),
            "schedule": self._schedule,
            "metrics": metrics,
            "val_curve": self._curve,
            "config": self.config,
        }
        machines = merge_segments(self._segments)
        if len(machines) > 1:  # resumed elsewhere: which machine ran which epochs
            record["segments"] = machines
        query_ranks = getattr(pl_module, "test_query_ranks", None) if self.ranks else None
        if query_ranks is not None and trainer.datamodule is not None:
            record["ranks_file"] = write_query_ranks(ranks_path(self.path), *query_ranks,
                                                     trainer.datamodule.pairs("test")).name
        else:  # a rank file left by an earlier run of another model must not pass for this one's
            ranks_path(self.path).unlink(missing_ok=True)
        write_results(self.path, record)  # last: its existence marks the run finished


def merge_segments(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The segments that ran at least one epoch, consecutive ones on the same machine merged."""
    merged: list[dict[str, Any]] = []
    for seg in segments:
        if seg["last_epoch"] < seg["first_epoch"]:
            continue  # resumed and stopped before finishing an epoch
        if merged and merged[-1]["hardware"] == seg["hardware"]:
            merged[-1]["last_epoch"] = seg["last_epoch"]
        else:
            merged.append(dict(seg))
    return merged


#: How epochs restored from a checkpoint older than the machine record are named.
NOT_RECORDED = "not recorded (a checkpoint from before machines were recorded)"


def hardware_of(segments: list[dict[str, Any]]) -> str:
    """The ``hardware`` of a record: the machine that ran its epochs, or each machine with its
    epochs when a resumed run moved (``A: epochs 1-8, then B: epochs 9-71``); this machine when
    no epoch was trained (a test-only run)."""
    merged = merge_segments(segments)
    if not merged:
        return hardware()
    if len(merged) == 1:
        return merged[0]["hardware"] or NOT_RECORDED

    def epochs(seg: dict[str, Any]) -> str:
        a, b = seg["first_epoch"], seg["last_epoch"]
        return f"epoch {a}" if a == b else f"epochs {a}-{b}"

    return ", then ".join(f"{seg['hardware'] or NOT_RECORDED}: {epochs(seg)}" for seg in merged)


def ranks_path(results_path: str | Path) -> Path:
    """Where the per-query test ranks of the results file ``results_path`` go."""
    path = Path(results_path)
    return path.with_name(path.stem + ".ranks_test.npz")


def write_query_ranks(path: Path, rows: np.ndarray, ranks: np.ndarray, pairs: Any) -> Path:
    """Per-query ranks with the identity of each query (user, prefix end, target), so that a
    comparison can check that two models ranked the same queries, and ``queries_total``, the
    number of test queries (more than the rows when the test pass was limited)."""
    return save_npz(path, row=rows, user=pairs.user[rows], end=pairs.end[rows], target=pairs.target[rows],
                    rank=ranks, queries_total=np.int64(len(pairs)))


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    """``np.savez_compressed`` through a temporary file: a reader never sees a half-written one."""
    with replacing(path) as tmp:
        np.savez_compressed(tmp, **arrays)
    return path
