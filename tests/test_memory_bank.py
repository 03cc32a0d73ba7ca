"""Memory bank: no leakage on real Beauty, -1 handling, padding/masks, tiny banks, save/load and
stale-bank detection, recall vs nprobe, determinism, the dynamic (add) bank, the faiss import site."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raserec.checkpoint import load_encoder, save_encoder
from raserec.data.datamodule import SequenceDataModule
from raserec.data.sequences import SequenceData
from raserec.errors import CheckpointError
from raserec.memory.bank import IndexConfig, MemoryBank, encode_pairs, length_batches
from raserec.models.encoders import SASRec

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- helpers
def synthetic_data(num_users: int = 300, num_items: int = 200, seed: int = 0, max_length: int = 30) -> SequenceData:
    """Random sequences (lengths 3..max_length) with a little structure (items drift by user)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_length + 1, size=num_users)
    base = rng.integers(1, num_items + 1, size=num_users)
    items = np.concatenate([
        (b + np.cumsum(rng.integers(-3, 4, size=n))) % num_items + 1 for b, n in zip(base, lengths, strict=True)
    ]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return SequenceData(offsets, items, np.array([str(u) for u in range(num_users)], dtype=object),
                        np.array([""] + [str(i) for i in range(1, num_items + 1)], dtype=object))


def synthetic_dm(data: SequenceData | None = None, **kwargs) -> SequenceDataModule:
    dm = SequenceDataModule("synthetic", cache_dir=None, **kwargs)
    dm.set_data(data if data is not None else synthetic_data())
    return dm


def tiny_encoder(num_items: int, seed: int = 0, hidden_size: int = 16) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(num_items, hidden_size=hidden_size, num_layers=1, inner_size=32).eval()


def check_no_leakage(bank: MemoryBank, rows: torch.Tensor, mask: torch.Tensor, users: np.ndarray,
                     ends: np.ndarray, k: int) -> None:
    """Every invariant of a search result."""
    rows, mask = rows.numpy(), mask.numpy()
    assert rows.shape == mask.shape == (len(users), k) and rows.dtype == np.int64
    assert np.all(rows[~mask] == -1) and np.all(rows[mask] >= 0) and np.all(rows < len(bank))
    # valid slots come first (best first), empty ones only at the end
    assert np.all(mask[:, :-1] >= mask[:, 1:])
    safe = np.where(mask, rows, 0)
    same_user = bank.users[safe] == users[:, None]
    assert not np.any(mask & same_user & (bank.ends[safe] >= ends[:, None])), "own pair or own future retrieved"
    # no entry twice in a row
    srt = np.sort(np.where(mask, rows, -np.arange(1, k + 1)), axis=1)
    assert np.all(np.diff(srt, axis=1) != 0)


# ----------------------------------------------------------------------------- leakage on Beauty
@pytest.fixture(scope="module")
def beauty_bank(beauty_dm: SequenceDataModule) -> tuple[SASRec, MemoryBank]:
    encoder = tiny_encoder(beauty_dm.num_items)
    bank = MemoryBank.build(encoder, beauty_dm.dataset("train"), IndexConfig(), progress=False,
                            reference_version=beauty_dm.reference_version("fit"))
    return encoder, bank


def test_beauty_training_queries_never_see_their_own_future(beauty_dm: SequenceDataModule, beauty_bank) -> None:
    _, bank = beauty_bank
    train = beauty_dm.pairs("train")
    assert len(bank) == 131_413 and bank.kind == "ivf_flat" and bank.nlist == 128 and bank.nprobe == 1
    k = 20
    raw_hits = valid = 0
    for start in range(0, len(train), 32_768):
        sl = slice(start, start + 32_768)
        users, ends = train.user[sl], train.end[sl]
        # The RAFT module uses the stored h of training queries: the same vectors as here.
        rows, mask = bank.search(bank.h[sl], users, ends, k)
        check_no_leakage(bank, rows, mask, users, ends, k)
        valid += int(mask.sum())
        # power check: without the filter the query itself (cosine 1) is almost always retrieved
        _, raw = bank.index.search(np.ascontiguousarray(bank.h[sl] / np.linalg.norm(bank.h[sl], axis=1,
                                                                                    keepdims=True)), 4 * k)
        raw_hits += int(((raw == np.arange(start, start + len(users))[:, None]).any(1)).sum())
    assert raw_hits > 0.9 * len(train)
    # the exact adaptive fetch finds the same neighbours as the authors' fixed 4k over-fetch
    sl = slice(0, 20_000)
    a = bank.search(bank.h[sl], train.user[sl], train.end[sl], k)
    f = bank.search(bank.h[sl], train.user[sl], train.end[sl], k, overfetch=4)
    assert torch.equal(a[1], f[1])
    # identical up to ties (pairs with identical prefixes have identical keys): compare similarities
    unit = bank.h[sl] / np.linalg.norm(bank.h[sl], axis=1, keepdims=True)
    keys = lambda r: bank.h[r.numpy()] / np.linalg.norm(bank.h[r.numpy()], axis=2, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(np.einsum("bd,bkd->bk", unit, keys(a[0])), np.einsum("bd,bkd->bk", unit, keys(f[0])),
                               atol=1e-5)
    assert (a[0] == f[0]).float().mean() > 0.95
    assert valid > 0.95 * k * len(train)  # IVF lists of ~1000 entries: nearly every slot filled


def test_beauty_validation_and_test_queries(beauty_dm: SequenceDataModule, beauty_bank) -> None:
    encoder, fit_bank = beauty_bank
    k = 20
    val = beauty_dm.pairs("val")
    h_val = encode_pairs(encoder, beauty_dm.dataset("val"), progress=False)
    rows, mask = fit_bank.search(h_val, val.user, val.end, k)
    check_no_leakage(fit_bank, rows, mask, val.user, val.end, k)
    # The test bank holds training + validation pairs, never a test pair (its target is the answer).
    ref = beauty_dm.reference_pairs("test")
    lengths = beauty_dm.data.lengths
    assert len(ref) == 131_413 + 22_363 and np.all(ref.end <= lengths[ref.user] - 2)
    test_bank = MemoryBank.from_arrays(
        np.concatenate([fit_bank.h, h_val]), ref.user, ref.end, ref.target, IndexConfig())
    test = beauty_dm.pairs("test")
    h_test = encode_pairs(encoder, beauty_dm.dataset("test"), progress=False)
    rows, mask = test_bank.search(h_test, test.user, test.end, k)
    check_no_leakage(test_bank, rows, mask, test.user, test.end, k)
    # The boundary: a user's own validation pair (end n-2) is allowed for the test query (end
    # n-1) but not for the validation query (end n-2). Query with the pair's own h (cosine 1).
    val_rows = np.arange(131_413, 131_413 + len(val))
    allowed, m_allowed = test_bank.search(h_val, test.user, test.end, 1)
    assert (allowed[:, 0].numpy() == val_rows).mean() > 0.95
    banned, m_banned = test_bank.search(h_val, val.user, val.end, 1)
    assert not np.any(banned[:, 0].numpy() == val_rows)
    # gather: masked slots are zeros, real ones the stored payload
    h_k, t_k = test_bank.gather(rows, mask)
    assert torch.equal(h_k[~mask], torch.zeros_like(h_k[~mask]))
    assert torch.equal(h_k[mask], torch.from_numpy(test_bank.h[rows[mask].numpy()]))
    assert torch.equal(t_k[mask], torch.from_numpy(test_bank.targets[rows[mask].numpy()]))
    assert int(t_k[~mask].abs().sum()) == 0


def test_filtered_search_equals_brute_force(beauty_dm: SequenceDataModule, beauty_bank) -> None:
    """Exact (flat) bank: the filtered top-k equals a brute-force top-k over the allowed entries,
    including queries of the longest histories (whose own future fills the over-fetch)."""
    _, ivf = beauty_bank
    train = beauty_dm.pairs("train")
    flat = MemoryBank.from_arrays(ivf.h, train.user, train.end, train.target, IndexConfig(kind="flat"))
    rng = np.random.default_rng(0)
    longest = np.argsort(beauty_dm.data.lengths)[-40:]
    q = np.concatenate([rng.choice(len(train), 200, replace=False),
                        np.flatnonzero(np.isin(train.user, longest) & (train.end <= 2))])
    k = 20
    keys = flat.h / np.linalg.norm(flat.h, axis=1, keepdims=True)
    sims = keys[q] @ keys.T
    banned = (train.user[None, :] == train.user[q][:, None]) & (train.end[None, :] >= train.end[q][:, None])
    assert banned.sum(1).max() > 3 * k  # some queries exclude more than the default over-fetch
    np.testing.assert_array_equal(flat.own_future_count(train.user[q], train.end[q]), banned.sum(1))
    sims[banned] = -np.inf
    expected = -np.sort(-sims, axis=1)[:, :k]
    for overfetch in (None, 4):  # exact adaptive fetch and the authors' fixed 4k (+ growth)
        rows, mask = flat.search(flat.h[q], train.user[q], train.end[q], k, overfetch=overfetch)
        check_no_leakage(flat, rows, mask, train.user[q], train.end[q], k)
        assert bool(mask.all())
        got = np.take_along_axis(sims, rows.numpy(), axis=1)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- edge cases
def test_faiss_minus_one_is_never_a_row() -> None:
    """IVF with nprobe 1 returns -1 when the probed list is short: those slots must be masked."""
    rng = np.random.default_rng(1)
    h = rng.normal(size=(400, 8)).astype(np.float32)
    bank = MemoryBank.from_arrays(h, np.arange(400), np.ones(400), np.arange(400) + 1, IndexConfig(nlist=10))
    assert bank.kind == "ivf_flat" and bank.nlist == 10
    _, raw = bank.index.search(np.ascontiguousarray(h[:50] / np.linalg.norm(h[:50], axis=1, keepdims=True)), 100)
    assert (raw == -1).any()  # the situation the authors' code gets wrong
    rows, mask = bank.search(h[:50], np.full(50, -1), np.ones(50), 100)
    check_no_leakage(bank, rows, mask, np.full(50, -1), np.ones(50), 100)
    assert (~mask).any() and (mask.sum(1) == torch.from_numpy((raw >= 0).sum(1))).all()


@pytest.mark.parametrize("kind", ["flat", "ivf_flat"])
def test_bank_accepts_any_dtype_and_layout_and_searches_float32(kind) -> None:
    """PITFALLS 9: faiss wants float32, C-contiguous arrays. float64, bf16 and transposed (not
    contiguous) tensors, and float64 numpy arrays, give the float32 bank and search exactly
    (bf16: the float32 values bf16 rounds to)."""
    rng = np.random.default_rng(2)
    h = rng.normal(size=(600, 8)).astype(np.float32)
    users, ends, targets = np.arange(600) % 50, np.arange(600) // 50 + 1, np.arange(600) + 1
    config = IndexConfig(kind=kind, nlist=4, nprobe=4)
    reference = MemoryBank.from_arrays(h, users, ends, targets, config)
    queries = torch.from_numpy(h[:64])
    expected = reference.search(queries, users[:64], ends[:64], 10)
    for built in (h.astype(np.float64), torch.from_numpy(h).double(), torch.from_numpy(h.T.copy()).T):
        assert not isinstance(built, torch.Tensor) or built.dtype != torch.float32 or not built.is_contiguous()
        bank = MemoryBank.from_arrays(built, users, ends, targets, config)
        assert bank.h.dtype == np.float32 and np.array_equal(bank.h, h)
        for q in (queries.double(), torch.from_numpy(h[:64].T.copy()).T, h[:64].astype(np.float64)):
            rows, mask = bank.search(q, users[:64], ends[:64], 10)
            assert torch.equal(rows, expected[0]) and torch.equal(mask, expected[1])
    rounded = torch.from_numpy(h).bfloat16()
    bank = MemoryBank.from_arrays(rounded, users, ends, targets, config)
    assert np.array_equal(bank.h, rounded.float().numpy())
    rows, mask = bank.search(rounded[:64], users[:64], ends[:64], 10)
    again = MemoryBank.from_arrays(rounded.float(), users, ends, targets, config).search(
        rounded[:64].float(), users[:64], ends[:64], 10)
    assert torch.equal(rows, again[0]) and torch.equal(mask, again[1])


def test_k_zero_and_empty_bank() -> None:
    h = np.ones((3, 4), np.float32)
    empty = MemoryBank(4)
    for bank, k in ((empty, 5), (empty, 0), (MemoryBank.from_arrays(h, [0, 1, 2], [1, 1, 1], [1, 2, 3]), 0)):
        rows, mask = bank.search(h, [5, 6, 7], [1, 1, 1], k)
        assert rows.shape == mask.shape == (3, k) and not mask.any() and bool((rows == -1).all())
        h_k, t_k = bank.gather(rows, mask)
        assert h_k.shape == (3, k, 4) and t_k.shape == (3, k) and not h_k.any() and not t_k.any()
    rows, mask = empty.search(np.ones((0, 4), np.float32), [], [], 3)
    assert rows.shape == (0, 3)


def test_fewer_survivors_than_k_are_padded_and_masked() -> None:
    h = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    users = np.array([0, 0, 0, 1, 1, 2])
    ends = np.array([1, 2, 3, 1, 2, 1])
    bank = MemoryBank.from_arrays(h, users, ends, np.arange(1, 7), IndexConfig(kind="flat"))
    rows, mask = bank.search(h[[1]], [0], [2], 10)  # user 0 at end 2: allowed = row 0 and users 1, 2
    check_no_leakage(bank, rows, mask, np.array([0]), np.array([2]), 10)
    assert sorted(rows[mask].tolist()) == [0, 3, 4, 5] and int(mask.sum()) == 4
    h_k, t_k = bank.gather(rows, mask)  # empty slots: zeros, never row -1 (the last entry)
    assert h_k.shape == (1, 10, 4) and not h_k[~mask].any() and not t_k[~mask].any()
    assert torch.equal(h_k[mask], torch.from_numpy(h[rows[mask].numpy()]))
    assert torch.equal(t_k[mask], rows[mask] + 1)


def test_overfetch_grows_for_users_with_long_histories() -> None:
    """200 near-duplicate pairs of the query's own future crowd out the 4k over-fetch."""
    rng = np.random.default_rng(0)
    centre = rng.normal(size=16).astype(np.float32)
    own = centre + 0.01 * rng.normal(size=(200, 16)).astype(np.float32)
    others = rng.normal(size=(300, 16)).astype(np.float32)
    h = np.concatenate([own, others])
    users = np.concatenate([np.zeros(200, np.int64), np.arange(1, 301)])
    ends = np.concatenate([np.arange(1, 201), np.ones(300, np.int64)])
    bank = MemoryBank.from_arrays(h, users, ends, np.ones(500), IndexConfig(kind="flat"))
    rows, mask = bank.search(centre[None], [0], [1], 5)
    assert bool(mask.all()) and bool((rows >= 200).all())
    rows, mask = bank.search(centre[None], [0], [1], 5, overfetch=4)  # fixed 4k, grown
    assert bool(mask.all()) and bool((rows >= 200).all())
    rows, mask = bank.search(centre[None], [0], [1], 5, overfetch=4, max_rounds=0)  # not grown: all dropped
    assert not mask.any()
    assert bank.own_future_count(np.array([0, 0, 0, 1, 1000]), np.array([1, 150, 201, 1, 1])).tolist() == [200, 51, 0, 1, 0]


def test_ivf_with_too_few_points_does_not_crash(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    for n, kind, expected_kind, expected_nlist in ((50, "ivf_flat", "flat", 0), (400, "ivf_flat", "ivf_flat", 10),
                                                   (1000, "ivf_pq", "ivf_flat", 25), (5000, "ivf_flat", "ivf_flat", 128)):
        caplog.clear()
        h = rng.normal(size=(n, 16)).astype(np.float32)
        with caplog.at_level(logging.WARNING, logger="raserec.memory.bank"):
            bank = MemoryBank.from_arrays(h, np.arange(n), np.ones(n), np.ones(n), IndexConfig(kind=kind, pq_m=4))
        assert (bank.kind, bank.nlist) == (expected_kind, expected_nlist)
        assert bool(caplog.records) == (n < 5000), caplog.text
        rows, mask = bank.search(h[:5], np.full(5, -1), np.ones(5), 3)
        assert rows[:, 0].tolist() == list(range(5))  # each point finds itself first


def test_ivf_pq_on_a_large_enough_bank() -> None:
    h = np.random.default_rng(0).normal(size=(12_000, 16)).astype(np.float32)
    bank = MemoryBank.from_arrays(h, np.arange(12_000), np.ones(12_000), np.ones(12_000),
                                  IndexConfig(kind="ivf_pq", nlist=16, nprobe=16, pq_m=4, pq_bits=6))
    assert bank.kind == "ivf_pq"
    rows, mask = bank.search(h[:20], np.full(20, -1), np.ones(20), 10)
    assert bool(mask.all()) and (rows[:, :10] == torch.arange(20)[:, None]).any(1).float().mean() > 0.8


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="index kind"):
        IndexConfig(kind="hnsw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nprobe"):
        IndexConfig(nprobe=0)
    with pytest.raises(ValueError, match="pq_m"):
        MemoryBank.from_arrays(np.ones((20_000, 10), np.float32), np.arange(20_000), np.ones(20_000),
                               np.ones(20_000), IndexConfig(kind="ivf_pq", pq_m=4))


# ----------------------------------------------------------------------------- recall, determinism
def _clustered(n: int, d: int = 32, centres: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    return (c[rng.integers(0, centres, n)] + 0.6 * rng.normal(size=(n, d))).astype(np.float32)


def recall_vs_exact(bank: MemoryBank, queries: np.ndarray, k: int = 10) -> float:
    keys = bank.h / np.linalg.norm(bank.h, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(q @ keys.T), axis=1)[:, :k]
    rows, mask = bank.search(queries, np.full(len(q), -1), np.ones(len(q)), k)
    hits = [len(set(r[m].tolist()) & set(e.tolist())) for r, m, e in zip(rows.numpy(), mask.numpy(), exact,
                                                                          strict=True)]
    return float(np.sum(hits)) / (k * len(q))


def test_recall_increases_with_nprobe_and_flat_is_exact() -> None:
    h = _clustered(20_000)
    queries = _clustered(300, seed=1)
    n = len(h)
    flat = MemoryBank.from_arrays(h, np.arange(n), np.ones(n), np.ones(n), IndexConfig(kind="flat"))
    assert recall_vs_exact(flat, queries) == 1.0
    ivf = MemoryBank.from_arrays(h, np.arange(n), np.ones(n), np.ones(n), IndexConfig(nlist=128, nprobe=1))
    recalls = []
    for nprobe in (1, 4, 16):
        ivf.set_nprobe(nprobe)
        recalls.append(recall_vs_exact(ivf, queries))
    assert recalls[0] < recalls[1] < recalls[2] <= 1.0, recalls
    assert recalls[2] > 0.9


def test_two_builds_are_identical(tmp_path: Path) -> None:
    """What DDP relies on: every rank builds the same bank from the same encoder and data."""
    dm = synthetic_dm(synthetic_data(num_users=600))
    encoder = tiny_encoder(dm.num_items)
    a = MemoryBank.build(encoder, dm.dataset("train"), IndexConfig(nlist=32), progress=False)
    b = MemoryBank.build(encoder, dm.dataset("train"), IndexConfig(nlist=32), progress=False)
    assert a.kind == "ivf_flat" and a.nlist == 32
    train = dm.pairs("train")
    ra, ma = a.search(a.h, train.user, train.end, 20)
    rb, mb = b.search(b.h, train.user, train.end, 20)
    assert torch.equal(ra, rb) and torch.equal(ma, mb)
    assert a.encoder_fingerprint == b.encoder_fingerprint


def test_build_restores_encoder_mode_and_sorting_keeps_rows() -> None:
    dm = synthetic_dm()
    encoder = tiny_encoder(dm.num_items).train()
    ds = dm.dataset("train")
    h = encode_pairs(encoder, ds, batch_size=64, progress=False)
    assert encoder.training  # restored
    with torch.no_grad():
        direct = encoder.eval()(ds.prefixes(torch.arange(len(ds)))).numpy()
    np.testing.assert_allclose(h, direct, atol=1e-5)  # row i is pair i despite the length sort


def test_length_batches_cover_every_row_once_in_one_length_batches() -> None:
    lengths = np.random.default_rng(0).integers(1, 51, 5_000)
    order, batches = length_batches(lengths, batch_size=300, token_budget=1_000)
    seen = np.concatenate([order[b] for b in batches])
    assert sorted(seen.tolist()) == list(range(5_000))
    for b in batches:
        batch_lengths = lengths[order[b]]
        assert len(set(batch_lengths.tolist())) == 1  # one length: no padding in the batch
        n = len(batch_lengths)
        assert 1 <= n <= 300 and (n * batch_lengths[0] <= 1_000 or n == 1)
    # a budget below one prefix still makes progress, one row at a time
    order, batches = length_batches(np.array([50, 50, 3]), batch_size=8, token_budget=10)
    assert [order[b].tolist() for b in batches] == [[2], [0], [1]]
    order, batches = length_batches(np.array([], dtype=np.int64), batch_size=8, token_budget=10)
    assert len(order) == 0 and batches == []  # an empty dataset: nothing to encode


def test_add_extends_the_bank_without_retraining() -> None:
    h = _clustered(6_000, d=16)
    n = 5_000
    bank = MemoryBank.from_arrays(h[:n], np.arange(n), np.ones(n), np.ones(n), IndexConfig(nlist=64))
    centroids = bank.index.quantizer.reconstruct_n(0, 64)
    bank.add(h[n:], np.arange(n, 6_000), np.ones(1_000), np.full(1_000, 7))
    assert len(bank) == bank.index.ntotal == 6_000
    np.testing.assert_array_equal(bank.index.quantizer.reconstruct_n(0, 64), centroids)
    rows, mask = bank.search(h[n:n + 50], np.full(50, -1), np.ones(50), 1)
    assert rows[:, 0].tolist() == list(range(n, n + 50))
    assert bank.gather(rows, mask)[1].unique().tolist() == [7]


# ----------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("content, error", [(b"[1, 2]", "not a memory bank manifest"),
                                            (b"\xff\xfe{", "unreadable memory bank manifest"),
                                            (b"{", "unreadable memory bank manifest")])
def test_a_damaged_manifest_is_one_error(tmp_path: Path, content: bytes, error: str) -> None:
    from raserec.memory.bank import _MANIFEST

    (tmp_path / _MANIFEST).write_bytes(content)
    with pytest.raises(CheckpointError, match=error):
        MemoryBank.read_manifest(tmp_path)


def test_save_load_round_trip_and_stale_banks(tmp_path: Path) -> None:
    dm = synthetic_dm(synthetic_data(num_users=600))
    enc_a, enc_b = tiny_encoder(dm.num_items, seed=0), tiny_encoder(dm.num_items, seed=1)
    save_encoder(enc_a, tmp_path / "a.pt")
    save_encoder(enc_b, tmp_path / "b.pt")
    enc_a, _ = load_encoder(tmp_path / "a.pt")
    enc_b, _ = load_encoder(tmp_path / "b.pt")
    version = dm.reference_version("fit")
    bank = MemoryBank.build(enc_a, dm.dataset("train"), IndexConfig(nlist=16, nprobe=2), progress=False,
                            reference_version=version)
    bank.save(tmp_path / "bank")
    manifest = MemoryBank.read_manifest(tmp_path / "bank")
    assert manifest["size"] == len(bank) and manifest["index_kind"] == "ivf_flat" and manifest["nlist"] == 16
    assert manifest["nprobe"] == 2 and manifest["dim"] == 16 and manifest["reference_version"] == version
    loaded = MemoryBank.load(tmp_path / "bank", expected_encoder=enc_a, expected_reference_version=version)
    train = dm.pairs("train")
    r1, m1 = bank.search(bank.h, train.user, train.end, 10)
    r2, m2 = loaded.search(loaded.h, train.user, train.end, 10)
    assert torch.equal(r1, r2) and torch.equal(m1, m2) and loaded.nprobe == 2
    np.testing.assert_array_equal(loaded.targets, bank.targets)
    with pytest.raises(CheckpointError, match="stale memory bank.*encoder"):
        MemoryBank.load(tmp_path / "bank", expected_encoder=enc_b)
    with pytest.raises(CheckpointError, match="stale memory bank.*reference set"):
        MemoryBank.load(tmp_path / "bank", expected_encoder=enc_a,
                        expected_reference_version=dm.reference_version("test"))
    with pytest.raises(CheckpointError, match="no memory bank"):
        MemoryBank.load(tmp_path / "nowhere")


def test_empty_bank_round_trip(tmp_path: Path) -> None:
    MemoryBank(8).save(tmp_path / "empty")
    loaded = MemoryBank.load(tmp_path / "empty")
    assert len(loaded) == 0 and loaded.search(np.ones((2, 8), np.float32), [0, 1], [1, 1], 4)[1].shape == (2, 4)


# ----------------------------------------------------------------------------- faiss import site
def test_faiss_has_a_single_import_site() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "raserec").rglob("*.py")
                 if p.name != "faiss_import.py" and any(
                     line.strip().startswith(("import faiss", "from faiss")) for line in p.read_text().splitlines())]
    assert offenders == []


@pytest.mark.parametrize("first", ["torch", "raserec", "faiss"])
def test_faiss_and_torch_work_together_in_a_fresh_process(first: str) -> None:
    """Whatever a user's script imports first (torch, raserec, or faiss itself), raserec loads
    torch before faiss where it can, and search and torch products work in one process."""
    prelude = {"torch": "import torch\n", "raserec": "import raserec.memory.faiss_import\n",
               "faiss": "import faiss\n"}[first]
    code = (prelude + "import sys, torch; before = torch.get_num_threads()\n"
            "from raserec.memory.bank import MemoryBank; import numpy as np\n"
            "order = list(sys.modules)\n"
            f"assert {first == 'faiss'} or order.index('torch') < order.index('faiss'), 'faiss loaded before torch'\n"
            # faiss resolves OpenMP to torch's runtime: importing it must not change torch's threads
            "assert torch.get_num_threads() == before, (before, torch.get_num_threads())\n"
            "h = np.random.default_rng(0).normal(size=(3000, 8)).astype('float32')\n"
            "b = MemoryBank.from_arrays(h, np.arange(3000), np.ones(3000), np.ones(3000))\n"
            "r, m = b.search(torch.from_numpy(h[:4]), [-1] * 4, [1] * 4, 2)\n"
            "assert r[:, 0].tolist() == [0, 1, 2, 3]\n"
            "print(float((torch.from_numpy(h) @ torch.from_numpy(h).T).trace() > 0))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("RASEREC_FAISS_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "1.0"


def test_auto_index_is_chosen_by_bank_size() -> None:
    from raserec.memory.bank import auto_index

    assert auto_index(10_000) == ("flat", 0, 1)
    assert auto_index(131_413) == ("ivf_flat", 2048, 8)
    assert auto_index(10_000_000) == ("ivf_flat", 4096, 8)
    assert auto_index(100_000_000)[0] == "ivf_pq"
    rng = np.random.default_rng(0)
    small = MemoryBank.from_arrays(rng.normal(size=(1000, 8)).astype(np.float32), np.arange(1000), np.full(1000, 3),
                                   rng.integers(1, 50, 1000), IndexConfig(kind="auto"))
    assert small.kind == "flat" and small.nlist == 0
    n = 60_000
    big = MemoryBank.from_arrays(rng.normal(size=(n, 8)).astype(np.float32), np.arange(n), np.full(n, 3),
                                 rng.integers(1, 50, n), IndexConfig(kind="auto", nlist=16, nprobe=1))
    assert (big.kind, big.nlist, big.nprobe) == ("ivf_flat", 1024, 8)  # the configured nlist/nprobe are ignored
