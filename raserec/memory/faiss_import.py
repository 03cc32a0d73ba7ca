"""The one place raserec imports faiss.

Importing faiss and torch in some orders has crashed the pip wheels (faiss #2555, #3401); torch
first, then faiss, is the order that works everywhere, so every module takes ``faiss`` from here.

Threads: the faiss wheel bundles its own libgomp, but torch loads its libgomp with global symbol
visibility first, so faiss's OpenMP calls resolve to torch's runtime: faiss and torch share one
thread setting (``faiss.omp_set_num_threads(1)`` would also make torch single-threaded, and
vice versa; a test checks that importing this module changes nothing). Faiss therefore follows
torch (``torch.set_num_threads`` / ``OMP_NUM_THREADS``) unless ``RASEREC_FAISS_THREADS`` is set
explicitly, and one runtime means no two pools of spinning threads competing for the cores.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch  # noqa: F401  - imported for the load order only: torch before faiss

# isort: split
import faiss

__all__ = ["faiss", "set_threads", "one_thread"]


def set_threads(n: int) -> int:
    """Set the OpenMP threads faiss uses; as explained above this also sets torch's. Returns ``n``."""
    n = max(1, int(n))
    faiss.omp_set_num_threads(n)
    return n


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one OpenMP thread (faiss's and, as explained above, torch's), then
    restore torch's setting: for searches whose result must not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared OpenMP runtime: faiss's setting too
    try:
        yield
    finally:
        torch.set_num_threads(before)


if os.environ.get("RASEREC_FAISS_THREADS"):
    set_threads(int(os.environ["RASEREC_FAISS_THREADS"]))
