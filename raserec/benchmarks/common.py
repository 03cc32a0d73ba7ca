"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raserec.results import hardware, write_results

ROOT = Path(__file__).resolve().parents[2]


def timed(fn: Callable[[], Any], repeats: int = 5) -> dict[str, float]:
    """Median, min and max wall time of ``fn`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "repeats": repeats}


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)


def save(name: str, record: dict[str, Any], started: float | None = None) -> Path:
    """Write ``results/<name>`` with the command and hardware; with ``started`` (a
    ``time.perf_counter()`` reading) also the wall time since then, the torch thread count and
    the peak RSS (``metrics.peak_rss_gb``)."""
    record = {"command": " ".join(["python -m raserec.benchmarks." + Path(sys.argv[0]).stem, *sys.argv[1:]]),
              "hardware": hardware(), **record}
    if started is not None:
        import torch

        record["wall_time_s"] = round(time.perf_counter() - started, 2)
        record["torch_threads"] = torch.get_num_threads()
        record["metrics"] = {**record.get("metrics", {}), "peak_rss_gb": peak_rss_gb()}
    path = write_results(ROOT / "results" / name, record)
    print(f"wrote {path}")
    return path
