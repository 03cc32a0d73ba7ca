"""Leave-one-out splits, truncation, vectorised collation and same-target positives."""

from __future__ import annotations

import numpy as np
import torch

from raserec.data.batch import PairDataset, gather_prefixes
from raserec.data.datamodule import SequenceDataModule
from raserec.data.positives import SameTargetPositives
from raserec.data.split import predict_queries, test_queries, training_pairs, validation_queries
from tests.conftest import lines_to_data


def test_beauty_split_sizes(beauty_dm: SequenceDataModule) -> None:
    assert len(beauty_dm.pairs("train")) == 131_413
    assert len(beauty_dm.pairs("val")) == 22_363
    assert len(beauty_dm.pairs("test")) == 22_363
    assert beauty_dm.num_items == 12_101


def test_hand_computed_pairs() -> None:
    data = lines_to_data("7 10 20 30 40 50\n8 20 30 40")
    # dense ids: 10->1, 20->2, 30->3, 40->4, 50->5; users 7->0, 8->1
    train = training_pairs(data)
    # user 0 (5 items): t = 1, 2 -> targets 20, 30; user 1 (3 items): none
    assert train.user.tolist() == [0, 0]
    assert train.end.tolist() == [1, 2]
    assert train.target.tolist() == [2, 3]
    val, test = validation_queries(data), test_queries(data)
    assert val.end.tolist() == [3, 1] and val.target.tolist() == [4, 3]
    assert test.end.tolist() == [4, 2] and test.target.tolist() == [5, 4]
    pred = predict_queries(data)
    assert pred.end.tolist() == [5, 3] and pred.target.tolist() == [0, 0]


def test_no_target_of_validation_or_test_in_training_pairs() -> None:
    data = lines_to_data("1 1 2 3 4 5 6\n2 7 8 9\n3 1 9 8 7")
    train = training_pairs(data)
    lengths = data.lengths[train.user]
    assert np.all(train.end <= lengths - 3)  # the last two positions are never a training target


def test_prefix_truncation_and_left_padding() -> None:
    data = lines_to_data("1 " + " ".join(str(i) for i in range(1, 13)))  # one user, 12 items
    ds = PairDataset(test_queries(data), data.offsets, data.items, max_len=5)
    batch = ds.__getitems__([0])
    # test input = first 11 items, truncated to the last 5: items 7..11
    assert batch["input_ids"].tolist() == [[7, 8, 9, 10, 11]]
    assert batch["target"].tolist() == [12]
    short = PairDataset(training_pairs(data), data.offsets, data.items, max_len=5).__getitems__([0, 2])
    assert short["input_ids"].tolist() == [[0, 0, 0, 0, 1], [0, 0, 1, 2, 3]]


def test_gather_prefixes_matches_python_slicing() -> None:
    rng = np.random.default_rng(0)
    items = torch.from_numpy(rng.integers(1, 50, size=300))
    start = torch.from_numpy(rng.integers(0, 100, size=64))
    stop = start + torch.from_numpy(rng.integers(1, 120, size=64))
    out = gather_prefixes(items, start, stop, 20)
    for r in range(64):
        window = items[max(int(start[r]), int(stop[r]) - 20) : int(stop[r])].tolist()
        assert out[r].tolist() == [0] * (20 - len(window)) + window


def test_positives_same_target_and_different_pair(beauty_dm: SequenceDataModule) -> None:
    train = beauty_dm.pairs("train")
    pos = beauty_dm.positives
    rows = np.arange(len(train))
    sampled, has = pos.sample(rows, epoch=0)
    assert np.array_equal(train.target[sampled], train.target)
    size = pos.group_size(rows)
    assert np.all(sampled[size > 1] != rows[size > 1])
    assert np.all(sampled[size == 1] == rows[size == 1])  # policy "self": fallback to itself
    assert has.all()
    assert (size == 1).sum() > 0  # Beauty has targets with a single training pair


def test_positives_resampled_each_epoch_and_deterministic(beauty_dm: SequenceDataModule) -> None:
    rows = np.arange(len(beauty_dm.pairs("train")))
    a0, _ = beauty_dm.positives.sample(rows, epoch=0)
    a0_again, _ = beauty_dm.positives.sample(rows, epoch=0)
    a1, _ = beauty_dm.positives.sample(rows, epoch=1)
    assert np.array_equal(a0, a0_again)
    assert (a0 != a1).mean() > 0.3
    # a batch's draw does not depend on which other rows are in the batch
    sub, _ = beauty_dm.positives.sample(rows[1000:1100], epoch=0)
    assert np.array_equal(sub, a0[1000:1100])


def test_positives_cover_every_group_member() -> None:
    # target 9 is shared by four pairs; over many epochs every other member gets drawn
    targets = np.array([9, 9, 9, 9, 3, 5, 5])
    pos = SameTargetPositives.build(targets, num_items=10)
    drawn = {tuple(pos.sample(np.array([0]), epoch=e)[0]) for e in range(200)}
    assert drawn == {(1,), (2,), (3,)}
    p, has = pos.sample(np.array([4, 5, 6]), epoch=0)
    assert p.tolist() == [4, 6, 5] and has.tolist() == [True, True, True]


def test_positive_policy_exclude() -> None:
    pos = SameTargetPositives.build(np.array([9, 9, 3]), num_items=10, policy="exclude")
    p, has = pos.sample(np.array([0, 1, 2]), epoch=0)
    assert p.tolist() == [1, 0, 2]
    assert has.tolist() == [True, True, False]


def test_positives_built_from_training_split_only() -> None:
    # item 6 is only ever a validation/test target: it must not form a positive group
    data = lines_to_data("1 1 2 3 6 6\n2 4 2 3 7 8")
    dm = SequenceDataModule("unused.txt")
    dm.set_data(data)
    train = dm.pairs("train")
    assert dm.positives.group_size(np.arange(len(train))).sum() == sum(
        (train.target == t).sum() for t in train.target
    )
    assert dm.positives.indptr[data.item_ids.tolist().index("6") + 1] - dm.positives.indptr[
        data.item_ids.tolist().index("6")
    ] == 0


def test_train_loader_batches(tiny_file) -> None:
    dm = SequenceDataModule(tiny_file, batch_size=4, cache_dir=None, max_len=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    total = sum(len(b["target"]) for b in batches)
    assert total == len(dm.pairs("train")) == (5 - 3) + 0 + (8 - 3) + (4 - 3) + (6 - 3)
    for b in batches:
        assert b["input_ids"].shape[1] == 4
        assert (b["input_ids"][:, -1] > 0).all()  # left padding: the last column is always real


def test_reference_set_and_version(tiny_file) -> None:
    dm = SequenceDataModule(tiny_file, cache_dir=None)
    dm.setup("fit")
    n_train = len(dm.pairs("train"))
    assert len(dm.reference_pairs("fit")) == n_train
    assert len(dm.reference_pairs("test")) == n_train + 5  # + one validation pair per user
    assert dm.reference_version("fit") != dm.reference_version("test")
    assert dm.reference_version("fit") == dm.reference_version("validate")
    before = dm.reference_version("fit")
    import polars as pl

    dm.append_interactions(pl.DataFrame({"user": ["2"], "item": ["1"], "order": [99]}))
    assert dm.reference_version("fit") != before
    assert len(dm.pairs("train")) == n_train + 1
    off = SequenceDataModule(tiny_file, cache_dir=None, include_validation_in_reference=False)
    off.setup("test")
    assert len(off.reference_pairs("test")) == n_train
