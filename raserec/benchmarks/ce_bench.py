"""Full-softmax cross-entropy over the 12,101 Beauty items: the score-matrix form against the
row-block form (:class:`raserec.models.losses.ChunkedSoftmaxCE`), forward + backward.

    python -m raserec.benchmarks.ce_bench [--items 12101] [--steps 9]

Cases: pre-training (batch 256, item table trained), RAFT (batch 1024, item table frozen) and
Ada-Retrieval / SASRec at batch 1024 (table trained). The variants alternate call by call so
that machine noise hits them alike; the median is reported. Row-block sizes are compared to
choose ``CE_CHUNK_ROWS``. Writes results/ce_bench.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from raserec.benchmarks.common import save
from raserec.models.losses import CE_CHUNK_ROWS, ChunkedSoftmaxCE
from raserec.runtime import tune_allocator

CASES = {"pretrain_b256": (256, True), "raft_b1024_frozen_items": (1024, False), "b1024": (1024, True)}


def _time_case(batch: int, train_items: bool, args: argparse.Namespace) -> tuple[dict, dict]:
    """Median seconds per forward + backward of each variant, and every timing."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, args.dim, generator=g).requires_grad_()
    w = (torch.randn(args.items, args.dim, generator=g) * 0.1).requires_grad_(train_items)
    classes = torch.randint(0, args.items, (batch,), generator=g)
    inputs = (h, w) if train_items else (h,)
    variants = {"matrix": lambda: F.cross_entropy(h @ w.T, classes)}
    variants |= {f"rows{r}": (lambda r=r: ChunkedSoftmaxCE.apply(h, w, classes, r)) for r in args.rows}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.steps + 1):
        for name, fn in variants.items():
            t = time.perf_counter()
            torch.autograd.grad(fn(), inputs)
            if i:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=12101)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=9, help="timed calls per variant (after one warm-up)")
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 128], help="row-block sizes to compare")
    args = parser.parse_args(argv)
    tune_allocator()
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    details: dict[str, dict[str, list[float]]] = {}
    for case, (batch, train_items) in CASES.items():
        med, times = _time_case(batch, train_items, args)
        for k, v in med.items():
            metrics[f"{case}/{k}_ms"] = round(1000 * v, 2)
        metrics[f"{case}/speedup_rows{CE_CHUNK_ROWS}"] = round(med["matrix"] / med[f"rows{CE_CHUNK_ROWS}"], 2)
        details[case] = {k: [round(1000 * t, 2) for t in v] for k, v in times.items()}
        print(case, {k: round(1000 * v, 1) for k, v in med.items()}, flush=True)
    save("ce_bench.json", {
        "dataset": "Beauty sizes (12,101 items, d = 64), random inputs",
        "model": "full-softmax cross-entropy, forward + backward",
        "seeds": [0],
        "metrics": metrics,
        "notes": (f"median of {args.steps} alternating calls per variant after one warm-up; matrix = "
                  "F.cross_entropy(h @ W.T) (autograd through the [B, N] scores); rowsR = ChunkedSoftmaxCE with "
                  f"R rows per block (the package uses {CE_CHUNK_ROWS})"),
        "details_ms": details,
    }, started=start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
