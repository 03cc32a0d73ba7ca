"""Item side information: aligned with the dense ids, missing items counted, cached by content."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from raserec.data.datamodule import SequenceDataModule
from raserec.errors import DataError
from tests.conftest import BEAUTY, DATA, require


def _lines(tmp_path, rows: list[str]):
    path = tmp_path / "data.txt"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_features_follow_the_id_map_and_count_what_is_missing(tmp_path, caplog) -> None:
    # original item ids 10, 20, 30, 40; the dense ids follow first appearance in the data
    data_path = _lines(tmp_path, ["1 30 10 20", "2 20 40 30 10", "3 10 30 40"])
    feats = tmp_path / "items.jsonl"
    feats.write_text("\n".join(json.dumps(r) for r in [
        {"item": 10, "title": "ten", "categories": ["a", "b"]},
        {"item": 30, "title": "thirty"},
        {"item": 20, "categories": ["c"]},
        {"item": 99, "title": "not in the data"},
    ]) + "\n")
    dm = SequenceDataModule(data_path, cache_dir=str(tmp_path / "cache"), item_features=str(feats))
    with caplog.at_level(logging.INFO, logger="raserec.data.features"):
        f = dm.item_features
    assert f is not None and f.num_items == dm.num_items == 4
    titles = dict(zip(dm.data.item_ids[1:], f.column("title")[1:], strict=True))
    assert titles == {"10": "ten", "20": None, "30": "thirty", "40": None}
    cats = dict(zip(dm.data.item_ids[1:], f.column("categories")[1:], strict=True))
    assert cats["10"] == ["a", "b"] and cats["40"] is None
    assert f.missing("title") == 2 and f.has_record.tolist() == [False] + [i != "40" for i in dm.data.item_ids[1:]]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "1 feature record(s) name items the data does not have" in messages
    assert "1 of 4 items have no feature record" in messages
    # the parquet cache gives the same table; a changed file gets a new cache entry
    again = SequenceDataModule(data_path, cache_dir=str(tmp_path / "cache"), item_features=str(feats)).item_features
    assert again.table.equals(f.table) and np.array_equal(again.has_record, f.has_record)
    feats.write_text(json.dumps({"item": 40, "title": "forty"}) + "\n")
    changed = SequenceDataModule(data_path, cache_dir=str(tmp_path / "cache"), item_features=str(feats)).item_features
    assert changed.column("title")[list(dm.data.item_ids).index("40")] == "forty"
    # vectors keyed by original id are remapped; absent ones stay zero
    vec = f.add_vectors("emb", np.array([[1.0, 2.0], [3.0, 4.0]]), original_ids=np.array(["30", "99"]), data=dm.data)
    assert vec.shape == (5, 2) and vec[list(dm.data.item_ids).index("30")].tolist() == [1.0, 2.0]
    assert float(np.abs(vec).sum()) == 3.0 and f.vectors["emb"] is vec  # "99" is not in the data


def test_bad_feature_input_fails_with_one_clear_error(tmp_path) -> None:
    data_path = _lines(tmp_path, ["1 1 2 3 4", "2 2 3 1 4"])
    with pytest.raises(DataError, match="no such item feature file"):
        SequenceDataModule(data_path, cache_dir=None, item_features=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no id"}\n')
    with pytest.raises(DataError, match="no 'item' column"):
        _ = SequenceDataModule(data_path, cache_dir=None, item_features=str(bad)).item_features
    bad.write_text('{"item": 1}\n{"item": 1}\n')
    with pytest.raises(DataError, match="1 item id\\(s\\) appear more than once"):
        _ = SequenceDataModule(data_path, cache_dir=None, item_features=str(bad)).item_features
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="not a JSON-lines feature file"):
        _ = SequenceDataModule(data_path, cache_dir=None, item_features=str(bad)).item_features
    # auto without a file beside the data: no features, no error
    assert SequenceDataModule(data_path, cache_dir=None, item_features="auto").item_features is None


def test_beauty_item_text_aligns_with_the_real_data() -> None:
    dm = SequenceDataModule(require(BEAUTY), cache_dir=None, item_features="auto")
    f = dm.item_features
    assert f is not None and f.num_items == 12_101 and f.has_record[1:].all()
    assert f.missing("title_keywords") == 1 and f.missing("brand") == 12_101 - 7_454
    first = f.column("title_keywords")[list(dm.data.item_ids).index("1")]
    assert first == "nail lacquer simmer and shimmer"
    assert (DATA / "Beauty.items.jsonl").is_file()
