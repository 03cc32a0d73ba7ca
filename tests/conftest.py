"""Shared fixtures: the real shared datasets (read in place) and tiny synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
import torch

from raserec.data.datamodule import SequenceDataModule
from raserec.data.sequences import SequenceData, sequences_from_interactions

# Keep torch from oversubscribing the 2 CI cores: `make test` runs one pytest-xdist worker per
# core, so each worker (and each subprocess a test starts) gets its share of them, at most 2.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, _CORES // _WORKERS))))
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BEAUTY = DATA / "Beauty.txt"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared dataset {path} is not available")
    return path


def lines_to_data(text: str) -> SequenceData:
    """Line-format text (``user item item ...``) to SequenceData, without touching disk."""
    rows = []
    for line in text.strip().splitlines():
        user, *items = line.split()
        rows += [(user, item, i) for i, item in enumerate(items)]
    return sequences_from_interactions(pl.DataFrame(rows, schema=["user", "item", "order"], orient="row"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Correctness tests, not timings: one OpenMP thread keeps them fast on a shared 2-core host,
    where a second thread that gets descheduled stalls every parallel region (5-10x slower)."""
    from raserec.memory.faiss_import import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def beauty_dm() -> SequenceDataModule:
    dm = SequenceDataModule(require(BEAUTY), cache_dir=None)
    dm.setup("fit")
    return dm


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    """Five users, 12 items; the shapes of the splits can be worked out by hand."""
    path = tmp_path / "tiny.txt"
    path.write_text(
        "1 1 2 3 4 5\n"
        "2 2 3 4\n"
        "3 5 6 7 8 9 10 11 12\n"
        "4 1 3 5 7\n"
        "5 12 11 10 9 8 3\n"
    )
    return path


@pytest.fixture(scope="session")
def beauty_slice(tmp_path_factory) -> Path:
    """The first 1,500 users of the real Beauty file: a real-data slice small enough for end-to-end runs."""
    lines = require(BEAUTY).read_text().splitlines()[:1500]
    path = tmp_path_factory.mktemp("slice") / "beauty_slice.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def short_experiment(beauty_slice, tmp_path_factory):
    """`raserec experiment` (2 seeds, debug overlay: 5 training batches per stage) on the Beauty
    slice, with full validation and test passes; run once and shared by the runner, analysis and
    notebook tests. Returns (results dir, runs dir, experiment name)."""
    from raserec.cli import main

    root = tmp_path_factory.mktemp("experiment")
    results, runs = root / "results", root / "runs"
    repo = Path(__file__).resolve().parents[1]
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        code = main(["experiment", "--name", "beauty_raserec", "--pretrain", "configs/beauty_pretrain.yaml",
                     "--finetune", "configs/beauty_raft.yaml", "--overlay", "configs/debug.yaml", "--seeds", "1", "2",
                     "--results-dir", str(results), "--runs-dir", str(runs),
                     "--fit-args", f"--data.data_path {beauty_slice} --data.cache_dir null "
                                   "--trainer.limit_val_batches 1.0 --trainer.limit_test_batches 1.0"])
    finally:
        os.chdir(cwd)
    assert code == 0
    return results, runs, "beauty_raserec"
