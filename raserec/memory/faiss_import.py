"""The one place raserec imports faiss.

Importing faiss and torch in some orders has crashed the pip wheels (faiss #2555, #3401); torch
first, then faiss, is the order that works everywhere, so every module takes ``faiss`` from here.

Threads: the faiss wheel bundles its own OpenMP runtime, separate from torch's. Their worker
threads spin-wait after each parallel region and steal cores from each other when a training step
alternates torch ops and faiss searches; on a 2-core machine that can make both several times
slower. Faiss therefore gets half the cores (at least one) unless ``RASEREC_FAISS_THREADS`` says
otherwise; searches of a 1024-query batch are fast single-threaded anyway.
"""

from __future__ import annotations

import os

import torch  # noqa: F401  - must be imported before faiss (see above)

import faiss  # noqa: E402  # isort: skip

__all__ = ["faiss", "default_threads", "set_threads"]


def default_threads() -> int:
    """``RASEREC_FAISS_THREADS`` if set, else half the usable cores (at least 1)."""
    env = os.environ.get("RASEREC_FAISS_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, torch.get_num_threads()) // 2)


def set_threads(n: int | None = None) -> int:
    """Set faiss's OpenMP threads (``None``: :func:`default_threads`); returns the number set."""
    n = default_threads() if n is None else max(1, int(n))
    faiss.omp_set_num_threads(n)
    return n


set_threads()
