"""Item text -> embeddings -> semantic neighbours (the template generator and the hash embedder)."""

from __future__ import annotations

import numpy as np
import pytest

from raserec.data.datamodule import SequenceDataModule
from raserec.data.features import ItemFeatures
from raserec.errors import DataError
from raserec.semantic.embedders import HashEmbedder, embed_cached
from raserec.semantic.neighbours import item_neighbours
from raserec.semantic.text import render_items
from tests.conftest import BEAUTY, require


@pytest.fixture(scope="module")
def beauty() -> tuple[SequenceDataModule, ItemFeatures]:
    dm = SequenceDataModule(require(BEAUTY), cache_dir=None, item_features="auto")
    return dm, dm.item_features


def test_template_text_of_real_beauty_items(beauty) -> None:
    dm, features = beauty
    texts = render_items(features)
    assert len(texts) == 12_102 and texts[0] == ""
    first = texts[list(dm.data.item_ids).index("1")]
    assert first == "title: nail lacquer simmer and shimmer; categories: Makeup > Nails > Nail Polish; brand: OPI"
    assert sum(1 for t in texts[1:] if not t) == 0  # every Beauty item has a category path at least
    with pytest.raises(DataError, match="none of the text fields"):
        render_items(features, fields=[("description", "description")])


def test_hash_embedder_is_deterministic_normalised_and_semantic() -> None:
    emb = HashEmbedder(dim=128)
    v = emb.embed(["banana boat sport sunscreen lotion", "banana boat kids sunscreen lotion",
                   "red nail polish", ""])
    assert v.shape == (4, 128) and np.allclose(np.linalg.norm(v[:3], axis=1), 1.0) and not v[3].any()
    assert np.array_equal(v, HashEmbedder(dim=128).embed(["banana boat sport sunscreen lotion",
                                                          "banana boat kids sunscreen lotion", "red nail polish", ""]))
    assert v[0] @ v[1] > 0.4 > v[0] @ v[2]
    assert not np.array_equal(HashEmbedder(dim=128, seed=1).embed(["red nail polish"]), v[2:3])


def test_embedding_cache_is_keyed_by_embedder_and_text(tmp_path) -> None:
    emb = HashEmbedder(dim=16)
    a = embed_cached(emb, ["x y", "z"], tmp_path)
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 1
    assert np.array_equal(embed_cached(emb, ["x y", "z"], tmp_path), a)
    embed_cached(emb, ["x y", "w"], tmp_path)  # a changed input never reuses the old matrix
    embed_cached(HashEmbedder(dim=16, seed=3), ["x y", "z"], tmp_path)  # nor another embedder
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 3


def test_semantic_neighbours_exclude_the_item_and_find_its_kin(beauty) -> None:
    dm, features = beauty
    vectors = HashEmbedder(dim=256).embed(render_items(features))
    ids, sims = item_neighbours(vectors, k=10)
    assert ids.shape == (12_102, 10) and not ids[0].any()
    rows = np.arange(1, 12_102)
    assert not (ids[1:] == rows[:, None]).any() and (ids[1:] > 0).all()
    assert (np.diff(sims[1:], axis=1) <= 1e-6).all()  # best first
    titles = features.column("title_keywords")
    banana = next(i for i, t in enumerate(titles) if t == "banana boat sport coolzone sunscreen lotion sp")
    assert sum("banana boat" in (titles[j] or "") for j in ids[banana]) >= 3
