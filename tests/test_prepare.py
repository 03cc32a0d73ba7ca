"""Prepared datasets: atomic writes, verified loads, the parameter-keyed cache and the CLI helpers."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from raserec.data import prepare
from raserec.data.prepare import (
    cache_entry,
    dataset_stats_for,
    load_dataset,
    load_prepared,
    prepare_dataset,
    prepare_main,
    read_manifest,
    stats_main,
)
from raserec.data.readers import read_interactions
from raserec.data.sequences import SequenceData, sequences_from_interactions
from raserec.errors import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# users 1..4 have >= 3 items; users 9 and 10 are too short for leave-one-out and are dropped.
# Item 99 is seen only by user 9, so it disappears with them.
SMALL = "1 10 20 30 40\n2 20 30 10\n3 30 40 50 10 20\n4 50 40 30\n9 99 10\n10 20\n"


def beauty() -> Path:
    path = DATA / "Beauty.txt"
    if not path.is_file():
        pytest.skip(f"shared dataset {path} not present (expected ../shared/data next to the repo)")
    return path


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "raw" / "small.txt"
    path.parent.mkdir()
    path.write_text(SMALL)
    return path


def same(a: SequenceData, b: SequenceData) -> bool:
    return (
        np.array_equal(a.offsets, b.offsets)
        and np.array_equal(a.items, b.items)
        and a.user_ids.tolist() == b.user_ids.tolist()
        and a.item_ids.tolist() == b.item_ids.tolist()
    )


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- prepare / load
def test_round_trip_and_manifest(tmp_path: Path, small: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        out = prepare_dataset(small, tmp_path / "ds")
    assert "dropped 2 users with fewer than 3 interactions" in caplog.text
    expected = sequences_from_interactions(read_interactions(small))
    loaded = load_prepared(out)
    assert same(loaded, expected)
    assert loaded.items.dtype == np.int32 and loaded.offsets.dtype == np.int64
    assert loaded.user_ids.tolist() == ["1", "2", "3", "4"]
    assert loaded.item_ids.tolist() == ["", "10", "20", "30", "40", "50"]
    assert loaded.sequence(2).tolist() == [3, 4, 5, 1, 2]

    m = read_manifest(out)
    assert m["format_version"] == 1 and m["name"] == "small"
    assert m["source"] == str(small.resolve())
    assert m["params"] == {"k_core": 0, "min_length": 3, "format": "lines"}
    assert m["dropped_users"] == 2
    assert m["content_hash"] == expected.content_hash()
    assert m["stats"]["users"] == 4 and m["stats"]["items"] == 5 and m["stats"]["interactions"] == 15
    assert m["created"].endswith("+00:00")

    inter = pl.read_parquet(out / "interactions.parquet")
    assert inter.schema == pl.Schema({"user": pl.Int32, "item": pl.Int32})
    assert inter["user"].to_list() == [0] * 4 + [1] * 3 + [2] * 5 + [3] * 3
    assert pl.read_parquet(out / "items.parquet")["item"].to_list() == [1, 2, 3, 4, 5]
    assert leftovers(tmp_path) == []


def test_min_length_counts_dropped_users(tmp_path: Path, small: Path) -> None:
    out = prepare_dataset(small, tmp_path / "ds4", min_length=4)
    m = read_manifest(out)
    assert m["dropped_users"] == 4  # users 2, 4 (3 items), 9 (2), 10 (1)
    assert load_prepared(out).user_ids.tolist() == ["1", "3"]


def test_k_core_recorded_in_manifest(tmp_path: Path, small: Path) -> None:
    out = prepare_dataset(small, tmp_path / "k3", k_core=3)
    m = read_manifest(out)
    # 3-core by hand: round 1 removes items 99, 50 (< 3 users) and user 10 (1 item); round 2
    # users 9 (item 10 left) and 4 (items 40, 30 left); round 3 item 40 (users 1, 3 left).
    assert m["params"]["k_core"] == 3
    report = m["k_core_report"]
    assert (report["rounds"], report["removed_users"], report["removed_items"]) == (3, 3, 3)
    assert m["dropped_users"] == 0
    assert m["stats"]["users"] == 3 and m["stats"]["items"] == 3 and m["stats"]["interactions"] == 9
    data = load_prepared(out)
    assert [[data.item_ids[i] for i in data.sequence(u)] for u in range(3)] == [
        ["10", "20", "30"], ["20", "30", "10"], ["30", "10", "20"],
    ]  # fmt: skip


def test_beauty_prepared_loads_fast(tmp_path: Path) -> None:
    out = prepare_dataset(beauty(), tmp_path / "beauty")
    load_prepared(out)  # warm-up
    start = time.perf_counter()
    data = load_prepared(out, verify=True)
    elapsed = time.perf_counter() - start
    assert (data.num_users, data.num_items, data.num_interactions) == (22_363, 12_101, 198_502)
    assert elapsed < 1.0, f"loading prepared Beauty took {elapsed:.2f}s"
    assert same(data, sequences_from_interactions(read_interactions(beauty())))


def test_tampered_parquet_is_detected(tmp_path: Path, small: Path) -> None:
    out = prepare_dataset(small, tmp_path / "ds")
    inter = pl.read_parquet(out / "interactions.parquet")
    items = inter["item"].to_numpy().copy()
    items[[0, 1]] = items[[1, 0]]  # swap two items of user 0: same ids, same counts
    inter.with_columns(item=pl.Series(items, dtype=pl.Int32)).write_parquet(out / "interactions.parquet")
    with pytest.raises(DataError, match="cache content hash mismatch.*re-run raserec prepare"):
        load_prepared(out)
    assert load_prepared(out, verify=False).sequence(0).tolist()[:2] == [2, 1]


def test_tampered_id_map_is_detected(tmp_path: Path, small: Path) -> None:
    out = prepare_dataset(small, tmp_path / "ds")
    items = pl.read_parquet(out / "items.parquet")
    items.with_columns(id=pl.Series(["10", "20", "30", "40", "55"])).write_parquet(out / "items.parquet")
    with pytest.raises(DataError, match="content hash mismatch"):
        load_prepared(out)


def test_missing_or_bad_files(tmp_path: Path, small: Path) -> None:
    out = prepare_dataset(small, tmp_path / "ds")
    (out / "users.parquet").unlink()
    with pytest.raises(DataError, match="missing users.parquet"):
        load_prepared(out)
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        load_prepared(out)
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_prepared(tmp_path / "nowhere")

    out = prepare_dataset(small, tmp_path / "v2")
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "format_version": 2}))
    with pytest.raises(DataError, match="format_version 2"):
        load_prepared(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest"):
        load_prepared(out)


def test_failed_prepare_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3\n2 4 x\n")
    out = tmp_path / "out" / "ds"
    with pytest.raises(DataError, match="line 2"):
        prepare_dataset(bad, out)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


def test_failure_while_writing_leaves_nothing(tmp_path: Path, small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out: Path, manifest: dict) -> None:
        assert (out / "interactions.parquet").exists()  # the parquet files were written already
        raise OSError("disk full")

    monkeypatch.setattr(prepare, "_write_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(small, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    assert leftovers(tmp_path) == []


def test_failed_overwrite_keeps_old_dataset(tmp_path: Path, small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = prepare_dataset(small, tmp_path / "ds")
    before = read_manifest(out)["content_hash"]
    monkeypatch.setattr(prepare, "_write", lambda data, out: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        prepare_dataset(small, out, k_core=3, overwrite=True)
    assert read_manifest(out)["content_hash"] == before
    assert load_prepared(out).num_users == 4
    assert leftovers(tmp_path) == []


def test_overwrite_rules(tmp_path: Path, small: Path) -> None:
    out = prepare_dataset(small, tmp_path / "ds")
    created = read_manifest(out)["created"]
    (out / "marker").write_text("kept if reused")
    assert prepare_dataset(small, out) == out  # same source and parameters: reused
    assert (out / "marker").exists() and read_manifest(out)["created"] == created

    with pytest.raises(DataError, match="different prepared dataset.*--overwrite"):
        prepare_dataset(small, out, min_length=4)
    prepare_dataset(small, out, min_length=4, overwrite=True)
    assert read_manifest(out)["params"]["min_length"] == 4
    assert not (out / "marker").exists()

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("do not delete")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare_dataset(small, other, overwrite=True)
    assert (other / "todo.txt").read_text() == "do not delete"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_prepared(prepare_dataset(small, empty)).num_users == 4


# ----------------------------------------------------------------------------- cache
def test_cache_keyed_on_content_and_params(tmp_path: Path, small: Path) -> None:
    cache = tmp_path / "cache"
    data = load_dataset(small, cache_dir=cache)
    assert same(data, sequences_from_interactions(read_interactions(small)))
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("small-") and len(entries[0]) == len("small-") + 16

    # same parameters (auto == lines) -> same entry, loaded rather than rebuilt
    assert cache_entry(small, cache, fmt="lines") == cache / entries[0]
    mtime = (cache / entries[0] / "manifest.json").stat().st_mtime_ns
    assert same(load_dataset(small, cache_dir=cache, fmt="lines"), data)
    assert (cache / entries[0] / "manifest.json").stat().st_mtime_ns == mtime

    # a different k-core -> a different entry with different content
    k3 = load_dataset(small, cache_dir=cache, k_core=3)
    assert len(list(cache.iterdir())) == 2
    assert k3.num_interactions == 9 and data.num_interactions == 15
    assert cache_entry(small, cache, min_length=4) != cache_entry(small, cache)

    # an edited source at the same path -> a new entry, never the stale one
    small.write_text(SMALL + "5 10 20 30\n")
    fresh = load_dataset(small, cache_dir=cache)
    assert fresh.num_users == 5
    assert len(list(cache.iterdir())) == 3

    # a tampered cache entry is refused, not silently used
    entry = cache_entry(small, cache)
    (entry / "manifest.json").write_text(
        json.dumps({**read_manifest(entry), "content_hash": "0" * 64})
    )
    with pytest.raises(DataError, match="content hash mismatch"):
        load_dataset(small, cache_dir=cache)


def test_load_dataset_without_cache_and_prepared_dir(tmp_path: Path, small: Path) -> None:
    in_memory = load_dataset(small)
    assert not any(p.name != "raw" for p in tmp_path.iterdir())  # nothing written
    out = prepare_dataset(small, tmp_path / "ds")
    assert same(load_dataset(out), in_memory)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.txt")


def test_dataset_stats_for(tmp_path: Path, small: Path) -> None:
    raw = dataset_stats_for(small)
    out = prepare_dataset(small, tmp_path / "ds")
    assert dataset_stats_for(out) == raw
    assert raw == {"users": 4, "items": 5, "interactions": 15, "avg_length": 3.75, "sparsity": 0.25}


# ----------------------------------------------------------------------------- CLI helpers
def test_stats_main_json_beauty(capsys: pytest.CaptureFixture[str]) -> None:
    assert stats_main([str(beauty()), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert set(stats) == {"users", "items", "interactions", "avg_length", "sparsity"}
    assert (stats["users"], stats["items"], stats["interactions"]) == (22_363, 12_101, 198_502)
    assert round(stats["avg_length"], 2) == 8.88
    assert round(100 * stats["sparsity"], 2) == 99.93


def test_stats_main_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = prepare_dataset(beauty(), tmp_path / "beauty", name="Beauty")
    assert stats_main([str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["dataset", "#users", "#items", "#inters", "avg.", "length", "sparsity"]
    assert lines[1].split() == ["Beauty", "22,363", "12,101", "198,502", "8.88", "99.93%"]


def test_stats_main_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert stats_main([str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope.txt'}: no such file\n"
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3\n1 4 5\n")
    assert stats_main([str(bad), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "duplicate user" in captured.err
    assert "Traceback" not in captured.err
    assert stats_main([]) == 2  # argparse usage error: exit code, not SystemExit


def test_prepare_main(tmp_path: Path, small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    assert prepare_main([str(small), str(out), "--k-core", "0", "--name", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "prepared tiny" in text and "dropped users (< 3 interactions): 2" in text
    assert read_manifest(out)["name"] == "tiny"

    assert prepare_main([str(small), str(out), "--min-length", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert prepare_main([str(small), str(out), "--min-length", "4", "--overwrite"]) == 0
    assert read_manifest(out)["params"]["min_length"] == 4
    capsys.readouterr()
    assert prepare_main([str(small), str(tmp_path / "x"), "--min-length", "2"]) == 2
    assert "--min-length must be >= 3" in capsys.readouterr().err


def test_prepare_main_amazon_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert prepare_main(["amazon:Beauty", str(tmp_path / "data" / "beauty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download") and "network unavailable" in err
    assert not (tmp_path / "data" / "beauty").exists()
    assert list((tmp_path / "data" / ".raw").iterdir()) == []


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT twice"])
def test_an_interrupted_prepare_leaves_nothing_after_the_next_run(tmp_path: Path, how: str) -> None:
    """A real `raserec prepare` of Beauty is interrupted while it writes; afterwards (for SIGKILL:
    after the next prepare, which sweeps what the dead process left) no temporary is left and the
    dataset is complete."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import BEAUTY, require

    out = tmp_path / "beauty"
    env = {**os.environ, "RASEREC_PREPARE_HOLD_S": "30"}
    proc = subprocess.Popen([sys.executable, "-m", "raserec.cli", "prepare", str(require(BEAUTY)), str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not any(name.startswith(".beauty.tmp-") and not name.endswith(".lock") and
                  (tmp_path / name / "interactions.parquet").exists() for name in _temporaries(tmp_path)):
        assert proc.poll() is None and time.time() < deadline, "prepare never reached its write"
        time.sleep(0.05)
    if how == "SIGKILL":
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert _temporaries(tmp_path), "the killed run should have left its temporary behind"
        # the next run (a new process, as a user would start it) sweeps what the dead one left
        again = subprocess.run([sys.executable, "-m", "raserec.cli", "prepare", str(BEAUTY), str(out)],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "stale temporary" in again.stderr
        assert prepare.is_prepared(out)
    else:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) != 0
        assert not out.exists()
    assert _temporaries(tmp_path) == []


def test_sweep_keeps_a_temporary_that_is_being_written(tmp_path: Path) -> None:
    import fcntl
    import os

    busy, dead = tmp_path / ".x.tmp-busy", tmp_path / ".y.tmp-dead"
    busy.mkdir()
    dead.mkdir()
    old = time.time() - 3600
    for d in (busy, dead):
        os.utime(d, (old, old))
    with open(f"{busy}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        removed = prepare.sweep_stale_temporaries(tmp_path)
    assert removed == [dead] and busy.is_dir() and not dead.exists()


def test_cr_only_line_endings_and_repeated_items(tmp_path: Path) -> None:
    """Old-Mac CR-only files are read line by line (not as one user whose items include the user
    ids); sparsity counts distinct (user, item) pairs, so repeats cannot make it negative."""
    cr = tmp_path / "mac.txt"
    cr.write_bytes(b"1 1 2 3\r2 2 3 4\r3 1 3 4\r")
    stats = dataset_stats_for(cr)
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 4, 9)
    repeats = tmp_path / "repeats.txt"
    repeats.write_text("1 1 1 1 1 1\n2 1 1 1 1 1\n")  # 2 users x 1 item, 10 interactions
    stats = dataset_stats_for(repeats)
    assert stats["interactions"] == 10 and stats["sparsity"] == 0.0
