"""Readers: line format, RecBole .inter, Amazon reviews json, k-core filter, download errors."""

from __future__ import annotations

import gzip
import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from raserec.data import readers
from raserec.data.readers import (
    detect_format,
    download_amazon,
    k_core_filter,
    read_amazon,
    read_inter,
    read_interactions,
    read_lines,
)
from raserec.data.sequences import dataset_stats, sequences_from_interactions
from raserec.errors import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The README table of ../shared/data: users, items, interactions, avg. length, sparsity (%).
TABLE = {
    "Beauty.txt": (22_363, 12_101, 198_502, 8.88, 99.93),
    "Sports_and_Outdoors.txt": (35_598, 18_357, 296_337, 8.32, 99.95),
    "Clothing_Shoes_and_Jewelry.txt": (39_387, 23_033, 278_677, 7.08, 99.97),
    "Yelp.txt": (30_431, 20_033, 316_354, 10.40, 99.95),
    "Toys_and_Games.txt": (19_412, 11_924, 167_597, 8.63, 99.93),
}


def shared(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"shared dataset {path} not present (expected ../shared/data next to the repo)")
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def rows(df: pl.DataFrame) -> list[tuple[str, str, int]]:
    return list(df.select("user", "item", "order").iter_rows())


# ----------------------------------------------------------------------------- shared data
@pytest.mark.parametrize("name", sorted(TABLE))
def test_shared_files_match_readme_table(name: str) -> None:
    data = sequences_from_interactions(read_interactions(shared(name)), source=name)
    stats = dataset_stats(data)
    users, items, inters, avg_len, sparsity_pct = TABLE[name]
    assert (stats["users"], stats["items"], stats["interactions"]) == (users, items, inters)
    assert round(stats["avg_length"], 2) == avg_len
    assert round(100 * stats["sparsity"], 2) == sparsity_pct
    # The files use 1-based integer ids and are 5-core already: every user has >= 5 items.
    assert data.lengths.min() >= 5


def test_beauty_reads_fast() -> None:
    path = shared("Beauty.txt")
    read_lines(path)  # warm-up (polars regex compilation, thread pool)
    start = time.perf_counter()
    df = read_lines(path)
    elapsed = time.perf_counter() - start
    assert df.height == 198_502
    assert elapsed < 1.0, f"reading Beauty took {elapsed:.2f}s"


def test_beauty_first_line_kept_in_order() -> None:
    df = read_lines(shared("Beauty.txt"))
    first = df.filter(pl.col("user") == "1")
    assert first["item"].to_list() == ["1", "2", "3", "4", "5"]
    assert first["order"].to_list() == [0, 1, 2, 3, 4]
    assert df.schema == pl.Schema({"user": pl.Utf8, "item": pl.Utf8, "order": pl.Int64})


# ----------------------------------------------------------------------------- line format
def test_lines_remaps_noncontiguous_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "small.txt", "30 100 5 17\n7 17 17 100 5\n12 5 100 17\n\n\n")
    df = read_lines(path)
    assert rows(df) == [
        ("30", "100", 0), ("30", "5", 1), ("30", "17", 2),
        ("7", "17", 0), ("7", "17", 1), ("7", "100", 2), ("7", "5", 3),
        ("12", "5", 0), ("12", "100", 1), ("12", "17", 2),
    ]  # fmt: skip
    data = sequences_from_interactions(df, source=str(path))
    # numeric (not lexicographic) order: items 5, 17, 100 -> 1, 2, 3; users 7, 12, 30 -> 0, 1, 2
    assert data.item_ids.tolist() == ["", "5", "17", "100"]
    assert data.user_ids.tolist() == ["7", "12", "30"]
    assert data.sequence(0).tolist() == [2, 2, 3, 1]
    assert data.sequence(1).tolist() == [1, 3, 2]
    assert data.sequence(2).tolist() == [3, 1, 2]
    # original ids are recoverable
    assert [data.item_ids[i] for i in data.sequence(2)] == ["100", "5", "17"]
    assert data.offsets.tolist() == [0, 4, 7, 10]


def test_lines_normalises_integer_ids_and_whitespace(tmp_path: Path) -> None:
    path = write(tmp_path, "ws.txt", "1  007\t8 9\r\n2 7 8 8\r\n")
    df = read_lines(path)
    assert rows(df) == [("1", "7", 0), ("1", "8", 1), ("1", "9", 2), ("2", "7", 0), ("2", "8", 1), ("2", "8", 2)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2 3\n2\n3 4 5\n", "line 2: user '2' has no items"),
        ("1 2 3\n2 4 x5\n", "line 2: id 'x5' is not an integer"),
        ("1 2 3\nu2 4 5\n", "line 2: id 'u2' is not an integer"),
        ("1 2 3\n2 4 5\n1 6 7\n", "line 3: duplicate user '1' (first on line 1)"),
        ("1 2 3\n\n2 4 5\n", "line 2: blank line"),
        ("", "empty file"),
        ("\n  \n\n", "empty file"),
    ],
)
def test_lines_errors(tmp_path: Path, text: str, message: str) -> None:
    assert_one_line_error(read_lines, write(tmp_path, "bad.txt", text), message)


def assert_one_line_error(reader, path: Path, message: str) -> None:
    """``reader(path)`` fails with one line that names the file and says ``message``."""
    with pytest.raises(DataError) as info:
        reader(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt: no such file"):
        read_interactions(tmp_path / "nope.txt")
    path = write(tmp_path, "data.csv", "1 2 3\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        read_interactions(path)
    assert rows(read_interactions(path, fmt="lines")) == [("1", "2", 0), ("1", "3", 1)]
    with pytest.raises(DataError, match="unknown format 'csv'"):
        read_interactions(path, fmt="csv")


def test_detect_format() -> None:
    assert detect_format("a/Beauty.txt") == "lines"
    assert detect_format("ml-1m.inter") == "inter"
    assert detect_format("reviews_Beauty_5.json") == "amazon"
    assert detect_format("reviews_Beauty_5.JSON.GZ") == "amazon"
    assert detect_format("x.bin", "inter") == "inter"


# ----------------------------------------------------------------------------- RecBole .inter
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def test_inter_orders_by_timestamp_ties_in_file_order(tmp_path: Path) -> None:
    body = (
        "u1\ta\t5\t300\n"
        "u2\tb\t4\t100\n"
        "u1\tb\t3\t100\n"
        "u1\tc\t1\t200\n"
        "u1\td\t2\t100\n"  # ties with u1-b at t=100: b comes first (file order)
        "u2\ta\t4\t50\n"
        "u2\tc\t4\t100\n"
    )
    path = write(tmp_path, "toy.inter", INTER_HEADER + body)
    df = read_interactions(path)
    assert df["order"].to_list() == [300, 100, 100, 200, 100, 50, 100]
    data = sequences_from_interactions(df)
    assert data.user_ids.tolist() == ["u1", "u2"]
    assert data.item_ids.tolist() == ["", "a", "b", "c", "d"]
    assert [data.item_ids[i] for i in data.sequence(0)] == ["b", "d", "c", "a"]
    assert [data.item_ids[i] for i in data.sequence(1)] == ["a", "b", "c"]


def test_inter_fractional_timestamps_keep_subsecond_order(tmp_path: Path) -> None:
    body = "u\ta\t1\t10.7\nu\tb\t1\t10.2\nu\tc\t1\t10.5\nu\td\t1\t10.2\n"
    df = read_inter(write(tmp_path, "f.inter", INTER_HEADER + body))
    assert df["order"].to_list() == [3, 1, 2, 1]  # dense rank; a plain int cast would tie all at 10
    data = sequences_from_interactions(df)
    assert [data.item_ids[i] for i in data.sequence(0)] == ["b", "d", "c", "a"]


def test_inter_without_timestamp_uses_row_order(tmp_path: Path) -> None:
    text = "item_id:token\tuser_id:token\n z\t1\ny\t1\nx\t1\nq\t2\n"
    df = read_inter(write(tmp_path, "n.inter", text))
    assert rows(df) == [("1", "z", 0), ("1", "y", 1), ("1", "x", 2), ("2", "q", 3)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1\t2\t3.0\t100\n", "line 1: no typed header"),
        ("user_id:float\titem_id:token\n1\t2\n", "field 'user_id' has type 'float', expected 'token'"),
        ("user_id:token\titem_id:token\ttimestamp:token\n1\t2\t3\n", "'timestamp' has type 'token'"),
        ("user_id:token\trating:float\n1\t2\n", "missing field 'item_id:token'"),
        ("user_id:token\titem_id\n1\t2\n", "header field 'item_id' is not 'name:type'"),
        ("user_id:token\titem_id:token\tx:blob\n1\t2\t3\n", "header field 'x:blob'"),
        (INTER_HEADER + "1\t2\t3\t4\n1\t2\t3\n", "line 3: 3 fields, header has 4"),
        (INTER_HEADER + "1\t2\t3\t4\n1\t2\t3\tsoon\n", "line 3: timestamp 'soon' is not a number"),
        (INTER_HEADER + "1\t\t3\t4\n", "line 2: empty item_id"),
        (INTER_HEADER, "header but no interactions"),
        ("", "empty file"),
    ],
)
def test_inter_errors(tmp_path: Path, text: str, message: str) -> None:
    assert_one_line_error(read_interactions, write(tmp_path, "bad.inter", text), message)


# ----------------------------------------------------------------------------- Amazon json
def review(user: str, item: str, t: int, **extra: object) -> dict[str, object]:
    return {"reviewerID": user, "asin": item, "unixReviewTime": t, "overall": 5.0, **extra}


# Hand-computed 2-core: round 1 removes C-i4 and D-i5 (i4, i5 and D have one interaction),
# round 2 removes C-i3 (C is left with one), round 3 removes A-i3 (i3 is left with one).
KCORE_REVIEWS = [
    review("A", "i1", 10), review("A", "i2", 20), review("A", "i3", 30),
    review("B", "i2", 15), review("B", "i1", 15),  # tie: file order keeps i2 before i1
    review("C", "i3", 5), review("C", "i4", 6),
    review("D", "i5", 7),
]  # fmt: skip


def write_reviews(path: Path, records: list[dict[str, object]]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["reviews_Toy_5.json", "reviews_Toy_5.json.gz"])
def test_amazon_k_core_needs_several_rounds(tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    path = write_reviews(tmp_path / name, KCORE_REVIEWS)
    raw = read_amazon(path)
    # sorted by time, ties in file order
    assert raw["order"].to_list() == [5, 6, 7, 10, 15, 15, 20, 30]
    assert raw["item"].to_list() == ["i3", "i4", "i5", "i1", "i2", "i1", "i2", "i3"]
    filtered, report = k_core_filter(raw, 2)
    assert rows(filtered) == [("A", "i1", 10), ("B", "i2", 15), ("B", "i1", 15), ("A", "i2", 20)]
    assert report == {
        "k": 2, "rounds": 3, "users": 2, "items": 2, "interactions": 4,
        "removed_users": 2, "removed_items": 3, "removed_interactions": 4,
    }  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="raserec.data.readers"):
        df = read_interactions(path, k_core=2)
    assert rows(df) == rows(filtered)
    assert "removed 2 users, 3 items, 4 interactions" in caplog.text
    data = sequences_from_interactions(df, min_length=2)
    assert [data.item_ids[i] for i in data.sequence(1)] == ["i2", "i1"]


def test_k_core_filter_noop_and_one_round(tmp_path: Path) -> None:
    df = read_lines(write(tmp_path, "k.txt", "1 1 2 3\n2 1 2 3\n3 1 2 4\n"))
    same, report = k_core_filter(df, 0)
    assert same.equals(df) and report["rounds"] == 0 and report["removed_interactions"] == 0
    out, report = k_core_filter(df, 2)  # item 4 appears once; user 3 keeps 2 items
    assert report["rounds"] == 1 and report["removed_items"] == 1 and report["removed_users"] == 0
    assert out.height == df.height - 1
    out, report = k_core_filter(df, 3)  # user 3 drops to 2 -> removed; then items 1, 2 have 2 users
    assert out.height == 0 and report["removed_users"] == 3
    with pytest.raises(DataError, match="no interactions left after 3-core"):
        read_interactions(tmp_path / "k.txt", k_core=3)


def test_amazon_default_is_5_core(tmp_path: Path) -> None:
    records = [review(f"u{u}", f"p{i}", 100 * u + i) for u in range(5) for i in range(5)]
    records += [review("extra", f"p{i}", 1) for i in range(4)]  # 4 reviews: below 5-core
    path = write_reviews(tmp_path / "reviews_Five_5.json", records)
    df = read_interactions(path)
    assert df.height == 25 and "extra" not in df["user"].to_list()
    assert read_interactions(path, k_core=0).height == 29


def test_amazon_python_literal_lines(tmp_path: Path) -> None:
    path = tmp_path / "reviews_Old_5.json"
    path.write_text(
        "{'reviewerID': 'A1', 'asin': 'B0', 'unixReviewTime': 1300000000, 'helpful': [0, 0]}\n"
        '{"reviewerID": "A1", "asin": "B1", "unixReviewTime": 1200000000}\n'
    )
    assert rows(read_amazon(path)) == [("A1", "B1", 1200000000), ("A1", "B0", 1300000000)]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"reviewerID": "A", "asin": "x", "unixReviewTime": 1}', '{"reviewerID": "A", "asin": '], "line 2: not a JSON object"),
        (['{"reviewerID": "A", "asin": "x", "unixReviewTime": 1}', "[1, 2]"], "line 2: not a JSON object"),
        (['{"reviewerID": "A", "unixReviewTime": 1}'], "line 1: missing field 'asin'"),
        (['{"reviewerID": "A", "asin": "x"}'], "line 1: missing field 'unixReviewTime'"),
        (['{"reviewerID": "A", "asin": "x", "unixReviewTime": "soon"}'], "line 1: unixReviewTime 'soon'"),
        ([""], "empty file"),
    ],
)
def test_amazon_errors(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "reviews_Bad_5.json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_interactions(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_corrupt_gzip_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "reviews_Bad_5.json.gz"
    path.write_bytes(gzip.compress(b'{"reviewerID": "A"}\n' * 50)[:40])
    with pytest.raises(DataError, match="cannot read file"):
        read_interactions(path)


# ----------------------------------------------------------------------------- download
def test_download_network_error_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def offline(url: str, timeout: float = 0) -> None:
        calls.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as info:
        download_amazon("Beauty", tmp_path / "raw")
    msg = str(info.value)
    assert "network unavailable" in msg and "local path" in msg and "reviews_Beauty_5.json.gz" in msg
    assert calls == [readers.AMAZON_URL.format(category="Beauty")]
    assert list((tmp_path / "raw").iterdir()) == []  # no half-written file


def test_download_skips_existing_and_rejects_bad_category(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    existing = write_reviews(tmp_path / "reviews_Toy_5.json.gz", KCORE_REVIEWS)
    assert download_amazon("Toy", tmp_path) == existing
    with pytest.raises(DataError, match="category must look like"):
        download_amazon("../etc", tmp_path)


def test_reader_output_feeds_sequences(tmp_path: Path) -> None:
    """Every reader returns exactly the normalised schema."""
    paths = [
        write(tmp_path, "a.txt", "1 2 3 4\n"),
        write(tmp_path, "a.inter", INTER_HEADER + "1\t2\t1\t5\n1\t3\t1\t6\n1\t4\t1\t7\n"),
        write_reviews(tmp_path / "a.json", [review("1", "2", 5), review("1", "3", 6), review("1", "4", 7)]),
    ]
    expected = pl.Schema({"user": pl.Utf8, "item": pl.Utf8, "order": pl.Int64})
    hashes = set()
    for path in paths:
        df = read_interactions(path, k_core=0)
        assert df.schema == expected, path
        data = sequences_from_interactions(df)
        assert np.array_equal(data.items, [1, 2, 3])
        hashes.add(data.content_hash())
    assert len(hashes) == 1
