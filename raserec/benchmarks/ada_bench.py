"""Ada-Retrieval phase-2 training step on Beauty: the current forward against the reference one.

    python -m raserec.benchmarks.ada_bench [--data ../shared/data] [--encoder results/beauty_raserec/seed_2024/encoder.pt]

A step is the whole phase-2 update at the config's batch (1024): five rounds (backbone, IRA, URA,
retrieval), the per-round loss, backward and the Adam step. "reference" re-creates the forward
before the speed-up inside this script: the filter as rFFT -> filter -> irFFT, every earlier
block filtered again in every later round, and the IRA's residual/dropout/LayerNorm on padding
positions too, and (``--loss ce``) each round's CE by autograd through its [B, N] score matrix.
"current" is the package's code: the filter as a per-channel k x k product, each block's
deterministic branch computed once, padding skipped, retrieval without autograd and each round's
CE as ChunkedSoftmaxCE (row blocks, gradients in the same pass). Both compute the same function
(checked here in eval mode on the same batch, and in tests/test_ada.py); steps alternate between
the two so that machine noise hits both alike. "current_bf16" is the current forward under bf16
autocast (``trainer.precision: bf16-mixed``, pays on CPUs with AVX512-BF16; not the same
arithmetic: a quality comparison belongs to a converged run). Writes results/ada_bench.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raserec.ada.module import AdaRetrievalModule
from raserec.benchmarks.common import ROOT, save
from raserec.data.datamodule import SequenceDataModule
from raserec.models.ada_adapters import FilterLayer, ItemRepresentationAdapter
from raserec.runtime import tune_allocator


@contextlib.contextmanager
def reference_forward() -> Iterator[None]:
    """Swap in the forward as it was before the speed-up (same function, more work)."""
    saved = (FilterLayer.filtered, FilterLayer.branch, FilterLayer.forward, ItemRepresentationAdapter.forward,
             AdaRetrievalModule.round_losses)
    current_losses = AdaRetrievalModule.round_losses

    def round_losses(self: AdaRetrievalModule, batch) -> torch.Tensor:
        if self.loss_kind != "ce":
            return current_losses(self, batch)
        out = self.rounds_output(batch, return_scores=True)  # autograd through every round's [B, N] scores
        return torch.stack([F.cross_entropy(s, batch["target"] - 1) for s in out.scores])

    def layer_forward(self: FilterLayer, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.dense(self.filtered(x))))

    def ira_forward(self: ItemRepresentationAdapter, history, blocks, real=None, branches=None):
        if len(blocks) == 0:
            return history
        context = torch.cat([self.filter_for(i)(b) for i, b in enumerate(blocks)], dim=1)  # every block again
        return self.attend(history, context)

    FilterLayer.filtered = FilterLayer.spectral
    FilterLayer.branch = lambda self, x: None  # the caller's cache: nothing is cached
    FilterLayer.forward = layer_forward
    ItemRepresentationAdapter.forward = ira_forward
    AdaRetrievalModule.round_losses = round_losses
    try:
        yield
    finally:
        (FilterLayer.filtered, FilterLayer.branch, FilterLayer.forward, ItemRepresentationAdapter.forward,
         AdaRetrievalModule.round_losses) = saved


def _step(module: AdaRetrievalModule, optimizer: torch.optim.Optimizer, batch) -> float:
    start = time.perf_counter()
    loss = module.weighted_loss(module.round_losses(batch))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--encoder", type=Path, default=ROOT / "results/beauty_raserec/seed_2024/encoder.pt",
                        help="a pre-trained Beauty encoder record (the committed seed-2024 one by default)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up each)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--loss", choices=["ce", "bce"], default="ce")
    args = parser.parse_args(argv)
    tune_allocator()
    dm = SequenceDataModule(args.data / "Beauty.txt", batch_size=args.batch_size, cache_dir=None)
    dm.setup("fit")
    ds = dm.dataset("train")
    rng = np.random.default_rng(0)
    batches = [ds.__getitems__(rng.choice(len(ds), args.batch_size, replace=False).tolist())
               for _ in range(args.steps + 1)]
    torch.manual_seed(0)
    module = AdaRetrievalModule(dm.num_items, encoder_checkpoint=str(args.encoder), loss=args.loss,
                                evaluate_base=False)
    optimizer = module.configure_optimizers()
    start = time.perf_counter()

    # Same function: eval-mode outputs of both forwards on one batch.
    module.eval()
    with torch.no_grad():
        current = module.rounds_output(batches[0])
        with reference_forward():
            reference = module.rounds_output(batches[0])
    max_diff = float((current.user_reprs - reference.user_reprs).abs().max())
    same_lists = float((current.retrieved == reference.retrieved).float().mean())

    module.train()
    times: dict[str, list[float]] = {"reference": [], "current": [], "current_bf16": []}
    contexts = {"reference": reference_forward, "current": contextlib.nullcontext,
                "current_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    for i, batch in enumerate(batches):  # the first round of steps warms up
        for name, context in contexts.items():
            with context():
                seconds = _step(module, optimizer, batch)
            if i > 0:
                times[name].append(seconds)
        print(i, {k: round(v[-1], 3) for k, v in times.items() if v}, flush=True)
    steps_per_epoch = -(-len(ds) // args.batch_size)
    ref, cur, bf16 = (statistics.median(times[k]) for k in ("reference", "current", "current_bf16"))
    save("ada_bench.json", {
        "dataset": "Beauty",
        "model": f"Ada-Retrieval phase 2 (SASRec, T=5 x k=20, loss {args.loss}), one training step",
        "seeds": [0],
        "wall_time_s": round(time.perf_counter() - start, 2),
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "metrics": {
            "reference/step_s": round(ref, 3),
            "current/step_s": round(cur, 3),
            "reference/epoch_s": round(ref * steps_per_epoch, 1),
            "current/epoch_s": round(cur * steps_per_epoch, 1),
            "current_bf16/step_s": round(bf16, 3),
            "current_bf16/epoch_s": round(bf16 * steps_per_epoch, 1),
            "speedup": round(ref / cur, 2),
            "speedup_bf16": round(ref / bf16, 2),
            "eval_max_abs_diff_user_reprs": max_diff,
            "eval_same_retrieved_fraction": same_lists,
        },
        "notes": (f"median of {args.steps} alternating steps per variant after one warm-up each; "
                  f"epoch = {steps_per_epoch} steps of the training part (no validation)"),
        "details": {k: [round(t, 3) for t in v] for k, v in times.items()},
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
