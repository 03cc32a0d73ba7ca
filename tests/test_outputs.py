"""Files replaced in one step: concurrent writers of one path, failures, and the order in which a
cache entry's matrix and manifest land."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from raserec import outputs
from raserec.outputs import replacing, umask
from raserec.semantic.embedders import load_checked, save_checked


def test_two_writers_of_one_path_each_get_their_own_temporary(tmp_path) -> None:
    """Two processes filling the same cache entry at once (seeds side by side, parallel test
    workers) used to share one fixed ``path.tmp``: the second truncated what the first was
    writing. Each writer now has its own; both land whole, the later one wins, nothing is left."""
    path = tmp_path / "cache" / "entry.npy"
    first_matrix, second_matrix = np.arange(6.0).reshape(2, 3), -np.ones((4, 5))
    with replacing(path) as first:
        np.save(first, first_matrix, allow_pickle=False)  # a suffix-adding writer keeps the name
        with replacing(path) as second:
            assert second != first and second.parent == first.parent == path.parent
            np.save(second, second_matrix, allow_pickle=False)
        assert np.array_equal(np.load(path), second_matrix)
        assert np.array_equal(np.load(first), first_matrix)  # untouched by the other writer
    assert np.array_equal(np.load(path), first_matrix)
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry.npy"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_replaced_file_gets_the_permissions_of_a_plain_open(tmp_path) -> None:
    """``mkstemp`` creates 0600: a shared cache written through it must not become private."""
    with replacing(tmp_path / "shared.txt") as tmp:
        tmp.write_text("x")
    (tmp_path / "plain.txt").write_text("x")
    mode = stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask()


def test_a_reader_never_finds_a_cached_matrix_without_its_manifest(tmp_path, monkeypatch) -> None:
    """A process reading an embedding cache while another fills it: after every single file
    replacement of ``save_checked`` the entry reads as absent or as the whole matrix, never as
    refused (the matrix used to land before its manifest: "cache file without its manifest")."""
    path = tmp_path / "embeddings-k.npy"
    matrix = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    seen = []
    real_replace = os.replace

    def replace_then_read(src, dst):
        real_replace(src, dst)
        seen.append(load_checked(path, "k"))  # raises DataError on a matrix without its manifest

    monkeypatch.setattr(outputs.os, "replace", replace_then_read)
    save_checked(path, matrix, {"key": "k"})
    assert [s is None for s in seen] == [True, False]
    assert np.array_equal(seen[-1], matrix)
