"""Training and evaluation throughput on Beauty (CPU). Writes results/train_bench.json.

One full training epoch (131,413 pairs, batch 1024, no validation) through Lightning for plain
SASRec and for the us_x pre-training, the us_x epoch at the pre-training config's batch 256 in
float32 and under bf16 autocast (``trainer.precision: bf16-mixed``; evaluation stays float32), and
one full-ranking pass over the 22,363 test queries.
The peer: RecBole 1.2.1 on the same kind of machine, 223 s per SASRec epoch, 614 s per DuoRec
us_x epoch, ~11 s per full-ranking pass (figures from the issue tracker, issue 3).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch

from raserec.benchmarks.common import peak_rss_gb, save
from raserec.data.datamodule import SequenceDataModule
from raserec.pretrain.module import PretrainModule
from raserec.runtime import tune_allocator

RECBOLE = {"sasrec_epoch_s": 223.0, "usx_epoch_s": 614.0, "eval_s": 11.0}


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)


def epoch_time(dm: SequenceDataModule, positive_pair: str, batches: float,
               precision: str = "32-true") -> dict[str, float]:
    """One pre-training epoch (or the fraction ``batches``) of SASRec with ``positive_pair``."""
    L.seed_everything(0)
    model = PretrainModule(dm.num_items, positive_pair=positive_pair, lambda_ret=0.1 if positive_pair != "none" else 0)
    return model_epoch_time(dm, model, batches, precision)


def model_epoch_time(dm: SequenceDataModule, model: L.LightningModule, batches: float,
                     precision: str = "32-true") -> dict[str, float]:
    """Training time of ``model`` over the fraction ``batches`` of an epoch (no validation),
    scaled to a full epoch of ``dm``'s training pairs."""
    clock = _TrainClock()
    trainer = _trainer(max_epochs=1, limit_train_batches=batches, limit_val_batches=0, precision=precision,
                       callbacks=[clock])
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    total = time.perf_counter() - start
    seconds = clock.seconds  # the training loop only: a model's one-off setup is reported apart
    steps = trainer.global_step
    sequences = min(steps * dm.batch_size, len(dm.pairs("train")))
    full_epoch = seconds * len(dm.pairs("train")) / sequences
    return {"measured_s": round(seconds, 2), "setup_s": round(total - seconds, 2), "steps": steps,
            "epoch_s": round(full_epoch, 2), "step_s": round(seconds / steps, 4),
            "sequences_per_s": round(sequences / seconds, 1)}


class _TrainClock(L.Callback):
    """Wall time from the start to the end of the training loop (after ``setup``)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self._start


def eval_time(dm: SequenceDataModule) -> float:
    model = PretrainModule(dm.num_items, positive_pair="none", lambda_ret=0.0)
    trainer = _trainer()
    trainer.test(model, datamodule=dm, verbose=False)  # warm-up
    start = time.perf_counter()
    trainer.test(model, datamodule=dm, verbose=False)
    return round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--batches", type=float, default=1.0, help="fraction of an epoch to time (1.0 = full)")
    parser.add_argument("--batches-256", type=float, default=0.25,
                        help="fraction of an epoch to time at batch 256 (each precision)")
    args = parser.parse_args()
    tune_allocator()
    dm = SequenceDataModule(args.data / "Beauty.txt", batch_size=args.batch_size, eval_batch_size=1024,
                            cache_dir=None)
    dm.setup("fit")
    start = time.perf_counter()
    sasrec = epoch_time(dm, "none", args.batches)
    print("sasrec", sasrec)
    usx = epoch_time(dm, "dropout_and_same_target", args.batches)
    print("us_x", usx)
    dm.batch_size = 256  # the pre-training config's batch
    usx256 = {p: epoch_time(dm, "dropout_and_same_target", args.batches_256, p) for p in ("32-true", "bf16-mixed")}
    print("us_x batch 256", usx256)
    dm.batch_size = args.batch_size
    ev = eval_time(dm)
    print("eval", ev)
    save("train_bench.json", {
        "dataset": "Beauty",
        "model": "SASRec (d=64, 2 layers, dropout 0.5) and us_x pre-training",
        "seeds": [0],
        "wall_time_s": round(time.perf_counter() - start, 2),
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "metrics": {
            "sasrec/epoch_s": sasrec["epoch_s"],
            "sasrec/sequences_per_s": sasrec["sequences_per_s"],
            "usx/epoch_s": usx["epoch_s"],
            "usx/sequences_per_s": usx["sequences_per_s"],
            "usx_b256/epoch_s": usx256["32-true"]["epoch_s"],
            "usx_b256_bf16/epoch_s": usx256["bf16-mixed"]["epoch_s"],
            "usx_b256/bf16_speedup": round(usx256["32-true"]["epoch_s"] / usx256["bf16-mixed"]["epoch_s"], 2),
            "test_eval_s": ev,
            "peak_rss_gb": peak_rss_gb(),
            "speedup_vs_recbole/sasrec": round(RECBOLE["sasrec_epoch_s"] / sasrec["epoch_s"], 2),
            "speedup_vs_recbole/usx": round(RECBOLE["usx_epoch_s"] / usx["epoch_s"], 2),
            "speedup_vs_recbole/eval": round(RECBOLE["eval_s"] / ev, 2),
        },
        "recbole_reference": RECBOLE,
        "targets": {"sasrec/epoch_s": 112.0, "usx/epoch_s": 307.0, "test_eval_s": 5.0},
        "details": {"sasrec": sasrec, "usx": usx, "usx_b256": usx256},
    })


if __name__ == "__main__":
    main()
