"""Shared fixtures: the real shared datasets (read in place) and tiny synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from raserec.data.datamodule import SequenceDataModule
from raserec.data.sequences import SequenceData, sequences_from_interactions

# Keep torch from oversubscribing the 2 CI cores when tests start subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")

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
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
