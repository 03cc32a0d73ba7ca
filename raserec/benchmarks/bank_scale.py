"""The memory bank at scale: build time, index memory, query latency per 1024 queries and
recall@20 against exact search, for banks of 131k, 1M and 10M entries (d = 64) with ``flat``,
``ivf_flat`` and ``ivf_pq``. Writes results/bank_scale.json.

    python -m raserec.benchmarks.bank_scale --encoder results/beauty_raserec/seed_2024/encoder.pt

Keys follow a trained Beauty encoder's key distribution: the encoder's h of the 131k Beauty
training pairs (L2-normalised, as the bank stores them); larger banks resample those keys with a
small Gaussian jitter (``--jitter`` times each dimension's standard deviation) and renormalise, so
the cluster structure IVF exploits is the real one. Queries are 1024 other jittered keys. IVF
uses nlist = 4 sqrt(n) rounded to a power of two (within 128, the paper's, and 4096), k-means
trained on 64 points per list. Memory is the index's own size: the codes,
ids and centroids (``faiss.serialize_index`` would copy a 10M-entry flat index). Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from raserec.benchmarks.common import peak_rss_gb, save
from raserec.checkpoint import load_encoder
from raserec.data.datamodule import SequenceDataModule
from raserec.memory.bank import encode_pairs, ivf_nlist, normalized
from raserec.memory.faiss_import import faiss

K = 20
_ALIVE: list[object] = []


def trained_keys(encoder_path: Path, data_path: Path) -> np.ndarray:
    encoder, _ = load_encoder(encoder_path)
    dm = SequenceDataModule(data_path, cache_dir=None)
    dm.setup("fit")
    return normalized(encode_pairs(encoder, dm.dataset("train"), progress=False))


def resample(keys: np.ndarray, n: int, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` keys: real ones (all of them first, when ``n`` allows) then jittered resamples."""
    if n <= len(keys):
        return keys[rng.choice(len(keys), n, replace=False)]
    scale = (jitter * keys.std(0)).astype(np.float32)
    out = np.empty((n, keys.shape[1]), np.float32)
    out[: len(keys)] = keys
    for start in range(len(keys), n, 1 << 20):  # chunks keep the temporary arrays small
        stop = min(n, start + (1 << 20))
        base = keys[rng.integers(0, len(keys), stop - start)]
        out[start:stop] = base + rng.standard_normal(base.shape, dtype=np.float32) * scale
    out[len(keys):] = normalized(out[len(keys):])
    return out


nlist_for = ivf_nlist  # the nlist of ``index: auto``


def build(kind: str, keys: np.ndarray, pq_m: int = 8) -> tuple[object, float, int]:
    """The index, its build seconds and its size in bytes."""
    n, d = keys.shape
    start = time.perf_counter()
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(keys)
        return index, time.perf_counter() - start, n * d * 4
    nlist = nlist_for(n)
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        code = d * 4
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        code = pq_m
    index.cp.seed = 0
    sample = keys[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)]
    index.train(sample)
    index.add(keys)
    _ALIVE.append(quantizer)  # keep it referenced: the IVF index does not own it
    seconds = time.perf_counter() - start
    extra = 256 * d * 4 if kind == "ivf_pq" else 0  # PQ codebooks
    return index, seconds, n * (code + 8) + nlist * d * 4 + extra


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(set(f[f >= 0].tolist()) & set(e.tolist())) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits)) / exact.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--encoder", type=Path, default=Path("results/beauty_raserec/seed_2024/encoder.pt"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/Beauty.txt"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[131_413, 1_000_000, 10_000_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf_flat", "ivf_pq"])
    parser.add_argument("--nprobes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--jitter", type=float, default=0.05)
    parser.add_argument("--out", default="bank_scale.json")
    args = parser.parse_args()
    start_all = time.perf_counter()
    rng = np.random.default_rng(2024)
    real = trained_keys(args.encoder, args.data)
    queries = resample(real, len(real) + 1024, args.jitter, rng)[len(real):]
    rows, metrics = [], {}
    for n in args.sizes:
        keys = resample(real, n, args.jitter, rng)
        exact_index, _, _ = build("flat", keys)
        _, exact = exact_index.search(queries, K)
        del exact_index
        for kind in args.kinds:
            index, seconds, size = build(kind, keys)
            for nprobe in ([0] if kind == "flat" else args.nprobes):
                if kind != "flat":
                    index.nprobe = nprobe
                index.search(queries[:64], K)  # warm-up
                t = time.perf_counter()
                _, found = index.search(queries, K)
                latency = time.perf_counter() - t
                row = {"entries": n, "kind": kind, "nlist": 0 if kind == "flat" else nlist_for(n),
                       "nprobe": nprobe, "build_s": round(seconds, 2), "index_mb": round(size / 2**20, 1),
                       "ms_per_1024_queries": round(1000 * latency, 2), "recall@20": round(recall(found, exact), 4)}
                rows.append(row)
                tag = f"{n}/{kind}" + (f"/nprobe{nprobe}" if kind != "flat" else "")
                metrics.update({f"{tag}/build_s": row["build_s"], f"{tag}/ms_per_1024_queries":
                                row["ms_per_1024_queries"], f"{tag}/recall@20": row["recall@20"],
                                f"{tag}/index_mb": row["index_mb"]})
                print(row, flush=True)
            del index
            _ALIVE.clear()
        del keys
    metrics["peak_rss_gb"] = peak_rss_gb()
    save(args.out, {
        "dataset": "Beauty keys (trained encoder), resampled with jitter beyond 131k",
        "model": f"faiss {faiss.__version__} flat / IVF-Flat / IVF-PQ (m 8, 8 bits), d = {real.shape[1]}",
        "seeds": [2024],
        "wall_time_s": round(time.perf_counter() - start_all, 2),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "metrics": metrics,
        "rows": rows,
        "notes": (f"keys: h of the 131,413 Beauty training pairs from {args.encoder}, normalised; larger banks "
                  f"resample them with Gaussian jitter {args.jitter} x per-dimension std; 1024 jittered queries; "
                  "recall@20 against exact inner-product search; nlist = 4 sqrt(n) (power of two, 128..4096), k-means on 64 points per list"),
    })


if __name__ == "__main__":
    main()
