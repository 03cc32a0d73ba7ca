"""`raserec analyze`: the paper's analyses on a RaSeRec model trained on a real Beauty slice, plus
the building blocks (grouping, noisy sequences, partitions, held-out recent items) on data whose
answers can be worked out by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import pytest

from raserec.analysis.common import Evaluator, equal_groups, load_raft
from raserec.analysis.drift import hold_out_recent
from raserec.analysis.noise import noisy_test_queries
from raserec.analysis.partitions import partition_of
from raserec.analysis.sensitivity import sensitivity
from raserec.cli import main
from raserec.data.datamodule import SequenceDataModule
from raserec.errors import RaserecError
from raserec.evaluation.per_query import metrics_from_ranks
from tests.conftest import lines_to_data

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- building blocks
def test_equal_groups_are_equal_sized_and_ordered():
    values = np.array([5, 1, 9, 3, 3, 7, 2, 8, 6, 4, 0], dtype=float)
    group = equal_groups(values, 4)
    sizes = np.bincount(group)
    assert sizes.sum() == 11 and sizes.max() - sizes.min() <= 1
    for g in range(3):  # every value of group g is <= every value of group g + 1
        assert values[group == g].max() <= values[group == g + 1].min()
    with pytest.raises(RaserecError, match="cannot split 3 queries into 4 groups"):
        equal_groups(values[:3], 4)


def test_partition_bounds_follow_table_7():
    assert partition_of(np.array([1, 2, 3, 6, 7, 50]), 3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert partition_of(np.array([1, 2, 3, 4]), 2, 3).tolist() == [0, 1, 1, 2]  # Clothing
    with pytest.raises(RaserecError):
        partition_of(np.array([1]), 5, 2)


def test_hold_out_recent_drops_the_items_before_validation():
    data = lines_to_data("u1 a b c d e f g\nu2 a b c d\nu3 a b c\n")
    reduced, lost = hold_out_recent(data, 2)
    seq = [reduced.item_ids[reduced.sequence(u)].tolist() for u in range(3)]
    # u1: a b c [d e] f g -> the two items before f (validation) and g (test) are held out
    assert seq == [["a", "b", "c", "f", "g"], ["a", "c", "d"], ["a", "b", "c"]]
    assert lost.tolist() == [2, 1, 0]
    assert reduced.num_items == data.num_items and (reduced.item_ids == data.item_ids).all()


def test_noisy_queries_keep_order_and_target(tmp_path):
    path = tmp_path / "d.txt"
    rng = np.random.default_rng(1)
    path.write_text("".join(f"{u} " + " ".join(map(str, rng.integers(1, 40, rng.integers(3, 15)))) + "\n"
                            for u in range(30)))
    dm = SequenceDataModule(path, cache_dir=None, max_len=100)
    dm.setup("test")
    clean = dm.dataset("test")
    noisy = noisy_test_queries(dm, 0.5, seed=3)
    batch_c, batch_n = clean.__getitems__(list(range(30))), noisy.__getitems__(list(range(30)))
    assert (batch_n["target"] == batch_c["target"]).all()
    for row in range(30):
        c = batch_c["input_ids"][row][batch_c["input_ids"][row] > 0].tolist()
        n = batch_n["input_ids"][row][batch_n["input_ids"][row] > 0].tolist()
        assert len(n) == len(c) + round(0.5 * len(c))
        it = iter(n)  # the original items appear in their order within the noisy sequence
        assert all(any(x == y for y in it) for x in c)
    again = noisy_test_queries(dm, 0.5, seed=3).__getitems__(list(range(30)))["input_ids"]
    other = noisy_test_queries(dm, 0.5, seed=4).__getitems__(list(range(30)))["input_ids"]
    assert (again == batch_n["input_ids"]).all() and not (other == batch_n["input_ids"]).all()


# ----------------------------------------------------------------------------- on a trained model
@pytest.fixture(scope="module")
def trained(short_experiment, beauty_slice):
    _, runs, name = short_experiment
    checkpoint = runs / name / "seed_1" / "finetune" / "checkpoints" / "best.ckpt"
    module, dm = load_raft(checkpoint, beauty_slice, cache_dir=None)
    return checkpoint, Evaluator(module, dm, progress=False)


def test_per_query_ranks_equal_the_lightning_test_loop(trained, short_experiment):
    checkpoint, ev = trained
    results, _, name = short_experiment
    logged = json.loads((results / name / "seed_1" / "finetune.json").read_text())["metrics"]
    m = metrics_from_ranks(ev.ranks(augmented=True), (5, 10))
    assert m["HR@10"] == pytest.approx(logged["test/HR@10"], abs=1e-6)
    assert m["NDCG@5"] == pytest.approx(logged["test/NDCG@5"], abs=1e-6)
    enc = json.loads((results / name / "seed_1" / "pretrain.json").read_text())["metrics"]
    assert metrics_from_ranks(ev.ranks(augmented=False), (10,))["NDCG@10"] == pytest.approx(enc["test/NDCG@10"],
                                                                                             abs=1e-6)


def test_sensitivity_alpha_one_is_the_encoder_and_beta_needs_two_channels(trained):
    checkpoint, ev = trained
    table, _ = sensitivity(ev, str(checkpoint), ["alpha"], {"alpha": [1.0, 0.5]}, mode="eval")
    encoder = metrics_from_ranks(ev.ranks(augmented=False), (5, 10))
    row = table.filter(pl.col("value") == 1.0).row(0, named=True)
    assert row["HR@10"] == encoder["HR@10"] and row["NDCG@5"] == encoder["NDCG@5"]
    tuned = metrics_from_ranks(ev.ranks(augmented=True), (5, 10))
    assert table.filter(pl.col("value") == 0.5).row(0, named=True)["NDCG@10"] == tuned["NDCG@10"]
    assert ev.module.ram.alpha == 0.5  # restored
    with pytest.raises(RaserecError, match="use --mode retrain"):
        sensitivity(ev, str(checkpoint), ["beta"], {"beta": [0.5]}, mode="eval")


def test_sensitivity_on_validation_measures_the_validation_queries_with_the_training_bank(trained):
    """Values are chosen on validation (never on test): --split val ranks the validation queries
    against the bank of training pairs only, as RAFT's own validation does."""
    checkpoint, ev = trained
    table, _ = sensitivity(ev, str(checkpoint), ["alpha", "k"], {"alpha": [1.0, 0.5], "k": [5]}, mode="eval",
                           split="val")
    assert (table["split"] == "val").all()
    val = ev.dm.dataset("val")
    encoder = metrics_from_ranks(ev.ranks(val, augmented=False, bank=ev.fit_bank()), (5, 10))
    tuned = metrics_from_ranks(ev.ranks(val, augmented=True, bank=ev.fit_bank()), (5, 10))
    rows = {(r["param"], r["value"]): r for r in table.iter_rows(named=True)}
    assert rows["alpha", 1.0]["NDCG@10"] == encoder["NDCG@10"] and rows["alpha", 0.5]["NDCG@10"] == tuned["NDCG@10"]
    test_tuned = metrics_from_ranks(ev.ranks(augmented=True), (5, 10))
    assert rows["alpha", 0.5]["NDCG@10"] != test_tuned["NDCG@10"]  # other queries than the test split's
    assert ev.module.retriever.k == 20  # K varied, then restored
    ev.module.retriever.k = 5
    try:
        k5 = metrics_from_ranks(ev.ranks(val, augmented=True, bank=ev.fit_bank()), (5, 10))
    finally:
        ev.module.retriever.k = 20
    assert rows["k", 5.0]["HR@5"] == k5["HR@5"] and rows["k", 5.0]["NDCG@10"] == k5["NDCG@10"]


def test_sensitivity_retrain_trains_a_ram_per_value(trained):
    checkpoint, ev = trained
    L.seed_everything(0)
    table, _ = sensitivity(ev, str(checkpoint), ["beta", "k"], {"beta": [0.0, 1.0], "k": [5]}, mode="retrain",
                           epochs=1, limit_train_batches=2)
    assert table["param"].to_list() == ["beta", "beta", "k"] and (table["mode"] == "retrain").all()
    assert table.select(pl.col("HR@10").is_between(0, 1).all()).item()


def _analyze(name: str, checkpoint: Path, data: Path, out: Path, *extra: str) -> pl.DataFrame:
    assert main(["analyze", name, "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--no-progress", "--cache-dir", "none", *extra]) == 0
    record = json.loads((out / f"{name}.json").read_text())
    assert record["command"].startswith(f"raserec analyze {name} --checkpoint {checkpoint} ")
    assert record["hardware"] and record["checkpoint"] == str(checkpoint)
    assert (out / f"{name}.png").stat().st_size > 5000
    return pl.read_csv(out / f"{name}.csv")


def test_cli_long_tail_and_user_activity(trained, beauty_slice, tmp_path):
    checkpoint, ev = trained
    table = _analyze("long_tail", checkpoint, beauty_slice, tmp_path)
    assert table.height == 10 and table["queries"].sum() == 1500
    assert (table["popularity_max"].to_numpy()[:-1] <= table["popularity_min"].to_numpy()[1:]).all()
    # the groups partition the test queries: their weighted mean is the overall metric
    overall = metrics_from_ranks(ev.ranks(augmented=True), (5,))["NDCG@5"]
    assert (table["raserec_NDCG@5"] * table["queries"]).sum() / 1500 == pytest.approx(overall)
    table = _analyze("user_activity", checkpoint, beauty_slice, tmp_path, "--groups", "4")
    assert table.height == 4 and table["queries"].to_list() == [375] * 4


def test_cli_partitions_and_noise(trained, beauty_slice, tmp_path):
    checkpoint, ev = trained
    table = _analyze("partitions", checkpoint, beauty_slice, tmp_path)
    assert table["partition"].to_list() == ["All", "S", "M", "L", "S+M", "S+L", "M+L"]
    entries = dict(zip(table["partition"], table["entries"], strict=True))
    assert entries["S"] + entries["M"] + entries["L"] == entries["All"] == len(ev.test_bank())
    assert entries["S+M"] == entries["S"] + entries["M"]
    full = metrics_from_ranks(ev.ranks(augmented=True), (5,))
    assert table.row(0, named=True)["NDCG@5"] == pytest.approx(full["NDCG@5"])
    table = _analyze("noise", checkpoint, beauty_slice, tmp_path, "--ratios", "0.2", "--notes", "a 5-batch model")
    assert table["ratio"].to_list() == [0.0, 0.0, 0.2, 0.2]
    assert json.loads((tmp_path / "noise.json").read_text())["notes"] == "a 5-batch model"  # the README's model column
    assert table["model"].to_list() == ["encoder", "raserec"] * 2


def test_derangement_has_no_fixed_point_and_is_seeded():
    from raserec.analysis.memory_use import derangement

    for n in (2, 3, 17, 1000):
        perm = derangement(n, np.random.default_rng(n))
        assert sorted(perm.tolist()) == list(range(n)) and not np.any(perm == np.arange(n))
    a, b = derangement(50, np.random.default_rng(1)), derangement(50, np.random.default_rng(1))
    assert np.array_equal(a, b) and not np.array_equal(a, derangement(50, np.random.default_rng(2)))


def test_cli_memory_use(trained, beauty_slice, tmp_path):
    checkpoint, ev = trained
    table = _analyze("memory_use", checkpoint, beauty_slice, tmp_path)
    assert table["variant"].to_list() == ["retrieved", "none", "shuffled", "half_bank"]
    rows = {r["variant"]: r for r in table.iter_rows(named=True)}
    # (a) through the fixed-memory path is exactly the module's own test ranking, (b) the encoder's
    tuned = metrics_from_ranks(ev.ranks(augmented=True), (5, 10))
    base = metrics_from_ranks(ev.ranks(augmented=False), (5, 10))
    for key in ("HR@5", "NDCG@5", "HR@10", "NDCG@10"):
        assert rows["retrieved"][key] == pytest.approx(tuned[key], abs=1e-12)
        assert rows["none"][key] == pytest.approx(base[key], abs=1e-12)
    assert rows["retrieved"]["change_NDCG@10_pct"] == 0.0
    assert rows["none"]["memories_per_query"] == 0.0 and rows["retrieved"]["memories_per_query"] > 15
    full = len(ev.test_bank())
    assert rows["retrieved"]["bank_entries"] == full and 0.45 * full < rows["half_bank"]["bank_entries"] < 0.55 * full
    record = json.loads((tmp_path / "memory_use.json").read_text())
    tests = record["paired_tests"]["retrieved_vs_shuffled"]["NDCG@10"]
    assert tests["mean_diff"] == pytest.approx(rows["retrieved"]["NDCG@10"] - rows["shuffled"]["NDCG@10"])
    assert isinstance(record["uses_retrieved_memories"], bool) and record["verdict"]


def test_cli_rejects_a_pretraining_checkpoint(short_experiment, beauty_slice, tmp_path, capsys):
    _, runs, name = short_experiment
    pre = runs / name / "seed_1" / "pretrain" / "checkpoints" / "best.ckpt"
    assert main(["analyze", "long_tail", "--checkpoint", str(pre), "--data", str(beauty_slice),
                 "--out", str(tmp_path), "--cache-dir", "none"]) == 2
    assert "not a RAFT checkpoint" in capsys.readouterr().err


def test_cli_drift_trains_without_recent_items_and_refreshes_the_bank(beauty_slice, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    overlay = tmp_path / "slice.yaml"
    overlay.write_text(f"data:\n  data_path: {beauty_slice}\n  cache_dir: null\n")
    out = tmp_path / "out"
    assert main(["analyze", "drift", "--pretrain-config", "configs/beauty_pretrain.yaml", "--finetune-config",
                 "configs/beauty_raft.yaml", "--overlay", "configs/debug.yaml", "--overlay", str(overlay),
                 "--holdout", "1", "--out", str(out), "--work-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    table = pl.read_csv(out / "drift.csv")
    assert table.height == 5 and table["variant"][1] == "RaSeRec, stale memory bank"
    assert table["gain_NDCG@10_pct"][1] == 0.0
    record = json.loads((out / "drift.json").read_text())
    assert record["command"].startswith("raserec analyze drift --pretrain-config configs/beauty_pretrain.yaml ")
    assert record["holdout"] == 1 and record["held_out_interactions"] == record["users_with_holdout"] > 1000
    # Re-running the command trains nothing again: finished stages are reused, an interrupted one
    # (no done.json) resumes from its last.ckpt, which here is already at max_epochs.
    stages = ["reduced_pretrain", "reduced_finetune", "full_pretrain", "full_finetune"]
    best = {s: json.loads((tmp_path / "runs" / s / "done.json").read_text())["best"] for s in stages}
    stamps = {s: Path(b).stat().st_mtime_ns for s, b in best.items()}
    (tmp_path / "runs" / "full_pretrain" / "done.json").unlink()
    assert main(["analyze", "drift", "--pretrain-config", "configs/beauty_pretrain.yaml", "--finetune-config",
                 "configs/beauty_raft.yaml", "--overlay", "configs/debug.yaml", "--overlay", str(overlay),
                 "--holdout", "1", "--out", str(out), "--work-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert {s: Path(b).stat().st_mtime_ns for s, b in best.items()} == stamps
    assert pl.read_csv(out / "drift.csv").equals(table)
    # --encoder: a full-data encoder given (as an encoder record would be) skips full stage 1;
    # only RAFT is retrained on all data, and the encoder row is that encoder's.
    encoder = tmp_path / "full_encoder.ckpt"
    Path(best["full_pretrain"]).rename(encoder)
    for stage in ("full_pretrain", "full_finetune"):
        shutil.rmtree(tmp_path / "runs" / stage)
    argv = ["analyze", "drift", "--pretrain-config", "configs/beauty_pretrain.yaml", "--finetune-config",
            "configs/beauty_raft.yaml", "--overlay", "configs/debug.yaml", "--overlay", str(overlay), "--holdout", "1",
            "--out", str(out), "--work-dir", str(tmp_path / "runs"), "--no-progress", "--encoder"]
    assert main([*argv, str(tmp_path / "missing.ckpt")]) == 2  # refused before any training
    assert not (tmp_path / "runs" / "full_finetune").exists()
    assert main([*argv, str(encoder)]) == 0
    assert not (tmp_path / "runs" / "full_pretrain").exists() and not (tmp_path / "runs" / "full_finetune").exists()
    # its RAFT runs in a directory of its own encoder (never reusing a RAFT trained on another)
    assert len(list((tmp_path / "runs").glob("full_finetune_*/done.json"))) == 1
    again = pl.read_csv(out / "drift.csv")
    assert again.row(3) == table.row(3)  # "encoder, retrained on all": the same encoder
    assert json.loads((out / "drift.json").read_text())["full_encoder"] == str(encoder)


def test_item_popularity_counts_the_training_part_only(tmp_path) -> None:
    """PITFALLS 1: long-tail groups are cut by popularity in what the models trained on; items seen
    only as validation or test targets must count 0 (counting all interactions leaks them)."""
    from raserec.analysis.groups import item_popularity

    path = tmp_path / "pop.txt"
    # item 9 is only ever a validation target, item 8 only a test target, item 1 is in every
    # training part, item 3 twice in one user's training part
    path.write_text("1 1 3 3 9 8\n2 1 2 9 8\n3 1 2 4 5 6\n")
    dm = SequenceDataModule(path, cache_dir=None)
    dm.setup("fit")
    data = dm.data
    popularity = item_popularity(dm)
    raw = {int(v): i for i, v in enumerate(data.item_ids) if i > 0}  # raw id -> internal id
    expected = {1: 3, 2: 2, 3: 2, 4: 1, 5: 0, 6: 0, 8: 0, 9: 0}
    assert {r: int(popularity[raw[r]]) for r in expected} == expected
    assert popularity.sum() == data.num_interactions - 2 * len(data.lengths)
