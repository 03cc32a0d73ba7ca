"""Memory-bank benchmark on Beauty: build time, retrieval share of a RAFT step, IVF recall vs flat.

    python -m raserec.benchmarks.memory_bench [--data ../shared/data] [--out results/memory_bench.json]

The encoder is a pre-training-sized SASRec (d = 64, 2 layers, 2 heads, FFN 256) with random
weights: build and step times depend only on the sizes, not on the weights. Recall figures are
for these random-weight keys; a trained encoder's keys cluster more, which usually helps IVF.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raserec.checkpoint import save_encoder
from raserec.data.datamodule import SequenceDataModule
from raserec.finetune.module import RAFTModule
from raserec.memory import faiss_import
from raserec.memory.bank import IndexConfig, MemoryBank, encode_pairs
from raserec.models.encoders import SASRec
from raserec.models.losses import next_item_loss
from raserec.results import hardware, write_results


def _time_build(encoder: SASRec, dm: SequenceDataModule) -> tuple[MemoryBank, dict[str, float]]:
    ds = dm.dataset("train")
    start = time.perf_counter()
    h = encode_pairs(encoder, ds, batch_size=2048, progress=False)
    encoded = time.perf_counter()
    pairs = ds.pairs
    bank = MemoryBank.from_arrays(h, pairs.user, pairs.end, pairs.target, IndexConfig())
    done = time.perf_counter()
    return bank, {"encode_s": round(encoded - start, 3), "index_s": round(done - encoded, 3),
                  "total_s": round(done - start, 3)}


def _time_steps(module: RAFTModule, dm: SequenceDataModule, steps: int, batch_size: int,
                reuse: bool) -> dict[str, float]:
    """Full RAFT training steps (forward incl. retrieval, CE loss, backward, Adam step)."""
    module.retriever.config = dataclasses.replace(module.retriever.config, reuse_h=reuse)
    module.train()
    optimizer = module.configure_optimizers()
    ds = dm.dataset("train")
    rng = np.random.default_rng(0)
    totals, retrievals = [], []
    for i in range(steps + 2):  # two warm-up steps
        batch = ds.__getitems__(rng.choice(len(ds), batch_size, replace=False).tolist())
        start = time.perf_counter()
        loss = next_item_loss(module.user_representation(batch), module.item_weights(), batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total = time.perf_counter() - start
        if i >= 2:
            totals.append(total)
            retrievals.append(module.retriever.retrieval_seconds)
    step, retrieval = statistics.median(totals), statistics.median(retrievals)
    return {"step_ms": round(1000 * step, 1), "retrieval_ms": round(1000 * retrieval, 1),
            "retrieval_overhead_pct": round(100 * retrieval / step, 1)}


def _recall(bank: MemoryBank, dm: SequenceDataModule, encoder: SASRec, queries: int, k: int = 20) -> dict:
    """Recall@k of the filtered IVF result against the filtered exact (flat) result."""
    val = dm.pairs("val")
    rows = np.random.default_rng(0).choice(len(val), queries, replace=False)
    h = encode_pairs(encoder, dm.dataset("val"), progress=False)[rows]
    users, ends = val.user[rows], val.end[rows]
    flat = MemoryBank.from_arrays(bank.h, bank.users, bank.ends, bank.targets, IndexConfig(kind="flat"))
    start = time.perf_counter()
    exact, exact_mask = flat.search(h, users, ends, k)
    out: dict[str, dict[str, float]] = {"flat": {"recall": 1.0, "search_ms_per_1024": round(
        1000 * (time.perf_counter() - start) * 1024 / queries, 2)}}
    truth = [set(r[m].tolist()) for r, m in zip(exact.numpy(), exact_mask.numpy(), strict=True)]
    for nprobe in (1, 4, 16):
        bank.set_nprobe(nprobe)
        start = time.perf_counter()
        got, mask = bank.search(h, users, ends, k)
        seconds = time.perf_counter() - start
        hits = sum(len(t & set(r[m].tolist())) for t, r, m in zip(truth, got.numpy(), mask.numpy(), strict=True))
        out[f"ivf_flat_nprobe{nprobe}"] = {
            "recall": round(hits / sum(len(t) for t in truth), 4),
            "filled_slots": round(float(mask.float().mean()), 4),
            "search_ms_per_1024": round(1000 * seconds * 1024 / queries, 2),
        }
    bank.set_nprobe(1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="directory holding Beauty.txt")
    parser.add_argument("--out", default="results/memory_bench.json")
    parser.add_argument("--steps", type=int, default=10, help="timed RAFT steps (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--recall-queries", type=int, default=4096)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads for the whole run (default: torch's choice)")
    parser.add_argument("--compare-threads", action="store_true",
                        help="also time the encoding with 1 thread and with torch's default thread count")
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load_before = os.getloadavg()

    dm = SequenceDataModule(Path(args.data) / "Beauty.txt", cache_dir=None)
    dm.setup("fit")
    torch.manual_seed(0)
    encoder = SASRec(dm.num_items, hidden_size=64, num_layers=2, num_heads=2, inner_size=256).eval()

    bench_start = time.perf_counter()
    bank, build = _time_build(encoder, dm)
    print(f"build: {build} ({len(bank)} entries, {bank.kind}, nlist {bank.nlist})", file=sys.stderr)
    by_threads = {}
    if args.compare_threads:
        threads = torch.get_num_threads()
        for n in sorted({1, default_threads}):
            torch.set_num_threads(n)
            start = time.perf_counter()
            encode_pairs(encoder, dm.dataset("train"), batch_size=2048, progress=False)
            by_threads[str(n)] = round(time.perf_counter() - start, 2)
            print(f"encode with {n} torch threads: {by_threads[str(n)]} s", file=sys.stderr)
        torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_encoder(encoder, Path(tmp) / "encoder.pt", {"num_items": dm.num_items})
        module = RAFTModule(num_items=dm.num_items, encoder_checkpoint=str(ckpt))
    module.retriever.bank = bank
    step = _time_steps(module, dm, args.steps, args.batch_size, reuse=True)
    print(f"RAFT step (query h from the bank): {step}", file=sys.stderr)
    step_encode = _time_steps(module, dm, args.steps, args.batch_size, reuse=False)
    print(f"RAFT step (query h re-encoded): {step_encode}", file=sys.stderr)
    recall = _recall(bank, dm, encoder, args.recall_queries)
    print(f"recall vs flat: {recall}", file=sys.stderr)

    record = {
        "command": shlex.join(["python", "-m", "raserec.benchmarks.memory_bench", *sys.argv[1:]]),
        "hardware": hardware(),
        "dataset": "Beauty",
        "model": "memory bank (faiss ivf_flat) + RAFT step, SASRec-sized encoder",
        "seeds": [0],
        "wall_time_s": round(time.perf_counter() - bench_start, 2),
        "metrics": {
            "build_total_s": build["total_s"],
            "encode_s": build["encode_s"],
            "index_s": build["index_s"],
            "raft_step_ms": step.get("step_ms"),
            "retrieval_ms": step.get("retrieval_ms"),
            "retrieval_overhead_pct": step.get("retrieval_overhead_pct"),
            **{f"recall@20/{k}": v["recall"] for k, v in recall.items()},
        },
        "threads": {"torch": torch.get_num_threads(), "faiss": faiss_import.faiss.omp_get_max_threads()},
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "encoder": "SASRec d=64, 2 layers, 2 heads, FFN 256, max_len 50 (random init: timing only)",
        "bank": {"entries": len(bank), "index": bank.kind, "nlist": bank.nlist, "nprobe": 1, "dim": bank.dim},
        "build_seconds": build,
        **({"encode_seconds_by_torch_threads": by_threads} if by_threads else {}),
        "raft_step": {
            "batch_size": args.batch_size, "k": module.retriever.k, "timed_steps": args.steps, "statistic": "median",
            "query_h_from_bank": step,
            "query_h_reencoded": step_encode,
        },
        "recall_at_20_vs_flat": {"queries": args.recall_queries, "query_set": "validation queries, leakage-filtered",
                                 **recall},
        "targets": {"build_seconds": 10, "retrieval_overhead_pct": 15},
        "notes": "retrieval = search + leakage filter + payload gather (MemoryRetriever.retrieval_seconds); "
                 "step = forward incl. retrieval + full-softmax CE + backward + Adam. query_h_from_bank is "
                 "the default (bank.reuse_h: the frozen encoder's h of a training query is its bank payload). "
                 "Timings vary with the host's load (recorded above); on a shared 2-core host torch with 2 "
                 "OpenMP threads can be several times slower than with 1 (see encode_seconds_by_torch_threads "
                 "when run with --compare-threads).",
    }
    write_results(args.out, record)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
