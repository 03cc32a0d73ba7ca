"""Pieces of the benchmark scripts that can be checked without timing anything."""

from __future__ import annotations

import numpy as np

from raserec.benchmarks.bank_scale import build, nlist_for, recall, resample
from raserec.benchmarks.peer_bench import write_atomic


def test_peer_atomic_file_is_recbole_inter_format(tmp_path) -> None:
    src = tmp_path / "d.txt"
    src.write_text("1 5 6 7\n2 6 5\n")
    path = write_atomic(src, tmp_path / "atomic", "D")
    lines = path.read_text().splitlines()
    assert path == tmp_path / "atomic" / "D" / "D.inter"
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert lines[1:] == ["1\t5\t0", "1\t6\t1", "1\t7\t2", "2\t6\t0", "2\t5\t1"]


def test_bank_scale_keys_recall_and_sizes() -> None:
    rng = np.random.default_rng(0)
    real = rng.standard_normal((500, 8)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    keys = resample(real, 1300, 0.05, rng)
    assert keys.shape == (1300, 8) and np.array_equal(keys[:500], real)
    assert np.allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    assert nlist_for(131_413) == 2048 and nlist_for(1000) == 128 and nlist_for(10_000_000) == 4096
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall(np.array([[1, 2, 9, -1], [5, 6, 7, 8]]), exact) == 0.75
    index, _, size = build("flat", keys)
    assert size == 1300 * 8 * 4 and index.ntotal == 1300
    _, found = index.search(keys[:10], 1)
    assert found[:, 0].tolist() == list(range(10))  # every key is its own nearest neighbour


def test_epoch_time_times_the_training_loop_and_scales_to_an_epoch(tiny_file) -> None:
    from raserec.benchmarks.semantic_bench import build as build_method
    from raserec.benchmarks.train_bench import epoch_time
    from raserec.data.datamodule import SequenceDataModule

    dm = SequenceDataModule(tiny_file, batch_size=4, eval_batch_size=4, cache_dir=None)
    dm.setup("fit")
    pairs = len(dm.pairs("train"))
    figures = epoch_time(dm, "dropout_and_same_target", batches=2)
    assert figures["steps"] == 2 and figures["setup_s"] >= 0
    # two batches of 4 of the training pairs, scaled up to all of them
    # both figures are rounded to 0.01 s: measured_s's rounding error is scaled up with it
    rounding = 0.005 * pairs / 8 + 0.005
    assert abs(figures["epoch_s"] - figures["measured_s"] * pairs / 8) <= rounding + 1e-9
    assert abs(figures["step_s"] * 2 - figures["measured_s"]) <= 0.01
    names = [o.name for o in build_method("sracl", dm.num_items).objectives]
    assert names == ["loss_rec", "loss_cs", "loss_is"]


def test_step_bench_variants_switch_what_they_name(tiny_file, monkeypatch) -> None:
    import torch

    from raserec.benchmarks import step_bench
    from raserec.data.datamodule import SequenceDataModule
    from raserec.models import layers

    dm = SequenceDataModule(tiny_file, batch_size=4, eval_batch_size=4, cache_dir=None)
    dm.setup("fit")
    batches = step_bench.fixed_batches(dm, 2)
    assert len(batches) == 2 and all("positive_ids" in b for b in batches)
    # the former float-draw mask: the dropout rate and the inverted scale
    torch.manual_seed(0)
    mask = step_bench.float_keep_mask(torch.empty(200_000), 0.5)
    assert set(mask.unique().tolist()) == {0.0, 2.0} and abs(float((mask == 0).float().mean()) - 0.5) < 0.01
    calls = []
    monkeypatch.setattr(step_bench, "float_keep_mask", lambda x, p: calls.append(p) or torch.ones_like(x))
    real = layers.keep_mask
    # Adam's loop and foreach: the same parameters after the same steps (same masks), bit for bit
    params = {}
    for foreach in (False, True):
        model, optimizer = step_bench.step_model(dm.num_items, foreach)
        assert optimizer.defaults["foreach"] is foreach
        step_bench.steps_ms(model, optimizer, batches, byte_masks=False)
        params[foreach] = [p.detach().clone() for p in model.parameters()]
    assert calls and set(calls) == {0.5}  # the float variant drew every dropout mask of the steps
    assert layers.keep_mask is real  # restored after the variant
    assert all(torch.equal(a, b) for a, b in zip(params[False], params[True], strict=True))
    drawn = len(calls)
    model, optimizer = step_bench.step_model(dm.num_items, True)
    step_bench.steps_ms(model, optimizer, batches, byte_masks=True)
    assert len(calls) == drawn  # the byte variant is the library's own keep_mask
    assert not all(torch.equal(a, b) for a, b in zip(params[True], model.parameters(), strict=True))
    ab = step_bench.step_ab(dm, steps=2, rounds=1)
    assert set(ab) == {"former", "foreach", "byte_masks", "both"} and all(len(v["rounds_ms"]) == 1 for v in ab.values())
