"""Readers for raw interaction files, each returning the normalised table (user, item, order).

Supported formats:

* ``lines`` (``.txt``): ``user item item ...`` per line, chronological, integer ids (the format
  of the S3-Rec/ICLRec/DuoRec benchmark files); ``order`` is the position in the line.
* ``inter`` (``.inter``): RecBole atomic files, tab-separated with a typed header
  (``user_id:token  item_id:token  timestamp:float``); ``order`` comes from ``timestamp``.
* ``amazon`` (``.json``/``.json.gz``): Amazon review dumps (``reviews_<Category>_5.json.gz``),
  one object per line with ``reviewerID``, ``asin`` and ``unixReviewTime``.

Every error is a one-line :class:`DataError` naming the file and, where there is one, the
1-based line number.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from raserec.data.sequences import INTERACTION_SCHEMA
from raserec.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("lines", "inter", "amazon")
#: Default k-core per format when ``k_core`` is None: the Amazon dumps are filtered to 5-core
#: as in the papers; the other formats are assumed to be prepared already.
DEFAULT_K_CORE = {"lines": None, "inter": None, "amazon": 5}
AMAZON_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_{category}_5.json.gz"
_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")


# ----------------------------------------------------------------------------- helpers
def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an interaction file")
    return path


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Whole file, transparently gunzipped (checked by magic bytes, not by name)."""
    try:
        if _is_gzip(path):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc


def _read_text(path: Path) -> str:
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate a BOM written by some editors
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 text") from exc


def _split_lines(path: Path, text: str, first_line: int = 1) -> tuple[pl.Series, int]:
    """Lines without the trailing blank ones; an interior blank line is an error (it usually
    means a truncated or concatenated file). Returns the lines and their 1-based start number."""
    if "\r" in text and "\n" not in text:
        # Old-Mac line endings: without this the whole file would be one "user" line.
        log.info("%s: CR-only line endings (classic Mac OS); reading each CR as a line break", path)
        text = text.replace("\r", "\n")
    lines = pl.Series("line", text.split("\n"), dtype=pl.Utf8).str.strip_chars_end("\r")
    blank = lines.str.strip_chars().str.len_bytes() == 0
    nonblank = (~blank).arg_true()
    if len(nonblank) == 0:
        return lines.clear(), first_line
    lines = lines.head(int(nonblank[-1]) + 1)
    blank = blank.head(len(lines))
    if blank.any():
        at = int(blank.arg_true()[0]) + first_line
        raise DataError(f"{path}: line {at}: blank line inside the file")
    return lines, first_line


# ----------------------------------------------------------------------------- line format
def read_lines(path: str | Path) -> pl.DataFrame:
    """Read the line format ``user item item ...``; ``order`` is the 0-based position in the line.

    Ids must be integers (they are normalised, so ``007`` and ``7`` are the same id): items
    positive, users non-negative. CR-only (classic Mac) line endings are read as line breaks.
    """
    path = _check_file(Path(path))
    lines, _ = _split_lines(path, _read_text(path))
    if len(lines) == 0:
        raise DataError(f"{path}: empty file")
    tokens = lines.str.extract_all(r"\S+")
    df = pl.DataFrame({"line": pl.int_range(1, len(lines) + 1, eager=True), "tok": tokens})
    df = df.with_columns(n=pl.col("tok").list.len())
    bad = df.filter(pl.col("n") < 2)
    if bad.height:
        row = bad.row(0, named=True)
        raise DataError(f"{path}: line {row['line']}: user {row['tok'][0]!r} has no items")
    df = df.select(
        "line",
        user=pl.col("tok").list.first(),
        item=pl.col("tok").list.slice(1),
        order=pl.int_ranges(0, pl.col("n") - 1, dtype=pl.Int64),
    )
    _check_integer_ids(path, df.select("line", tok="user"))
    # Duplicate user lines would silently merge two histories with clashing positions.
    dup = df.filter(~pl.col("user").cast(pl.Int64).is_first_distinct())
    if dup.height:
        row = dup.row(0, named=True)
        first = df.filter(pl.col("user").cast(pl.Int64) == int(row["user"]))["line"][0]
        raise DataError(f"{path}: line {row['line']}: duplicate user {row['user']!r} (first on line {first})")
    long = df.explode(["item", "order"])
    _check_integer_ids(path, long.select("line", tok="item"))
    # The format's contract: item ids are positive integers (0 is padding elsewhere), user ids
    # non-negative integers.
    for column, lowest, kind in (("user", 0, "a non-negative"), ("item", 1, "a positive")):
        ids = long.select("line", tok=column).filter(pl.col("tok").cast(pl.Int64) < lowest)
        if ids.height:
            row = ids.row(0, named=True)
            raise DataError(f"{path}: line {row['line']}: {column} id {row['tok']} is not {kind} integer")
    return long.select(
        user=pl.col("user").cast(pl.Int64).cast(pl.Utf8),
        item=pl.col("item").cast(pl.Int64).cast(pl.Utf8),
        order=pl.col("order").cast(pl.Int64),
    )


def _check_integer_ids(path: Path, df: pl.DataFrame) -> None:
    bad = df.filter(pl.col("tok").cast(pl.Int64, strict=False).is_null())
    if bad.height:
        row = bad.row(0, named=True)
        raise DataError(
            f"{path}: line {row['line']}: id {row['tok']!r} is not an integer (the line format needs integer ids)"
        )


# ----------------------------------------------------------------------------- RecBole .inter
def _parse_inter_header(path: Path, header: str) -> dict[str, tuple[int, str]]:
    fields = header.split("\t")
    typed = [f for f in fields if re.fullmatch(r"[^:\s]+:[^:\s]+", f.strip())]
    if not typed:
        raise DataError(
            f"{path}: line 1: no typed header (expected fields like 'user_id:token<TAB>item_id:token"
            "<TAB>timestamp:float'); is this a header-less file?"
        )
    out: dict[str, tuple[int, str]] = {}
    for pos, field in enumerate(fields):
        name, sep, typ = field.strip().partition(":")
        if not sep or not name or typ not in _RECBOLE_TYPES:
            raise DataError(
                f"{path}: line 1: header field {field!r} is not 'name:type' with type in {list(_RECBOLE_TYPES)}"
            )
        if name in out:
            raise DataError(f"{path}: line 1: duplicate header field {name!r}")
        out[name] = (pos, typ)
    for need in ("user_id", "item_id"):
        if need not in out:
            raise DataError(f"{path}: line 1: missing field '{need}:token' (header has {list(out)})")
        if out[need][1] != "token":
            raise DataError(f"{path}: line 1: field {need!r} has type {out[need][1]!r}, expected 'token'")
    if "timestamp" in out and out["timestamp"][1] != "float":
        raise DataError(
            f"{path}: line 1: field 'timestamp' has type {out['timestamp'][1]!r}, expected 'float'"
        )
    return out


def read_inter(path: str | Path) -> pl.DataFrame:
    """Read a RecBole atomic ``.inter`` file.

    ``order`` is the timestamp when the header has ``timestamp:float`` (integral timestamps are
    kept as they are; fractional ones are dense-ranked so sub-second order survives the cast to
    int64), otherwise the row position. Ties keep file order downstream (stable sort).
    """
    path = _check_file(Path(path))
    text = _read_text(path)
    header, _, body = text.partition("\n")
    header = header.rstrip("\r")
    if not text.strip():
        raise DataError(f"{path}: empty file")
    fields = _parse_inter_header(path, header)
    lines, _ = _split_lines(path, body, first_line=2)
    if len(lines) == 0:
        raise DataError(f"{path}: header but no interactions")
    parts = lines.str.split("\t")
    df = pl.DataFrame({"line": pl.int_range(2, len(lines) + 2, eager=True), "parts": parts})
    wrong = df.filter(pl.col("parts").list.len() != len(fields))
    if wrong.height:
        row = wrong.row(0, named=True)
        raise DataError(f"{path}: line {row['line']}: {len(row['parts'])} fields, header has {len(fields)}")
    cols: dict[str, Any] = {
        "user": pl.col("parts").list.get(fields["user_id"][0]).str.strip_chars(),
        "item": pl.col("parts").list.get(fields["item_id"][0]).str.strip_chars(),
    }
    if "timestamp" in fields:
        cols["ts_raw"] = pl.col("parts").list.get(fields["timestamp"][0]).str.strip_chars()
    df = df.select("line", **cols)
    for col, what in (("user", "user_id"), ("item", "item_id")):
        empty = df.filter(pl.col(col).str.len_bytes() == 0)
        if empty.height:
            raise DataError(f"{path}: line {empty['line'][0]}: empty {what}")
    if "timestamp" in fields:
        df = df.with_columns(ts=pl.col("ts_raw").cast(pl.Float64, strict=False))
        bad = df.filter(pl.col("ts").is_null() | ~pl.col("ts").is_finite())
        if bad.height:
            row = bad.row(0, named=True)
            raise DataError(f"{path}: line {row['line']}: timestamp {row['ts_raw']!r} is not a number")
        ts = df["ts"]
        integral = bool((ts == ts.floor()).all()) and float(ts.abs().max()) < 2.0**62  # type: ignore[arg-type]
        order = ts.cast(pl.Int64) if integral else ts.rank("dense").cast(pl.Int64)
    else:
        order = pl.int_range(0, df.height, eager=True).cast(pl.Int64)
    return pl.DataFrame({"user": df["user"], "item": df["item"], "order": order})


# ----------------------------------------------------------------------------- Amazon json
def _parse_record(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        # The 2014 dumps were written with Python's repr and read with eval(); literal_eval
        # parses them safely. Only tried when json fails, so valid JSON stays fast.
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(f"{path}: line {lineno}: not a JSON object") from None
    if not isinstance(rec, dict):
        raise DataError(f"{path}: line {lineno}: not a JSON object")
    return rec


def read_amazon(path: str | Path) -> pl.DataFrame:
    """Read an Amazon review dump (``.json`` or ``.json.gz``), sorted by ``unixReviewTime``
    with ties in file order. No k-core filtering here (see :func:`k_core_filter`)."""
    path = _check_file(Path(path))
    text = _read_text(path)
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        rec = _parse_record(path, lineno, line)
        try:
            user, item, t = rec["reviewerID"], rec["asin"], rec["unixReviewTime"]
        except KeyError as exc:
            raise DataError(f"{path}: line {lineno}: missing field {exc.args[0]!r}") from None
        if isinstance(t, bool) or not isinstance(t, (int, float, str)):
            raise DataError(f"{path}: line {lineno}: unixReviewTime {t!r} is not an integer")
        try:
            t_int = int(t)
        except (ValueError, OverflowError):
            raise DataError(f"{path}: line {lineno}: unixReviewTime {t!r} is not an integer") from None
        if not 0 <= t_int < 2**62:
            raise DataError(f"{path}: line {lineno}: unixReviewTime {t!r} is not a plausible Unix time")
        for name, value in (("reviewerID", user), ("asin", item)):
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise DataError(f"{path}: line {lineno}: {name} {value!r} is not a string")
        if user in (None, "") or item in (None, ""):
            raise DataError(f"{path}: line {lineno}: empty reviewerID or asin")
        users.append(str(user))
        items.append(str(item))
        times.append(t_int)
    if not users:
        raise DataError(f"{path}: empty file")
    df = pl.DataFrame(
        {"user": users, "item": items, "order": np.asarray(times, dtype=np.int64)},
        schema=INTERACTION_SCHEMA,
    )
    return df.sort("order", maintain_order=True)  # stable: equal times keep file order


def download_amazon(category: str, dest_dir: str | Path) -> Path:
    """Download ``reviews_<category>_5.json.gz`` into ``dest_dir`` (skipped when present).

    Written to a temporary file and renamed, so an interrupted download never leaves a
    half-written file that later looks complete.
    """
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", category):
        raise DataError(f"amazon:{category}: category must look like 'Beauty' or 'Sports_and_Outdoors'")
    dest_dir = Path(dest_dir)
    dest = dest_dir / f"reviews_{category}_5.json.gz"
    if dest.is_file():
        return dest
    url = AMAZON_URL.format(category=category)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                raise DataError(
                    f"cannot download {url}: network unavailable ({exc}); download the file elsewhere "
                    f"and pass its local path instead (e.g. raserec prepare {dest.name} OUT_DIR)"
                ) from None
        os.replace(tmp_name, dest)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    log.info("downloaded %s -> %s", url, dest)
    return dest


# ----------------------------------------------------------------------------- k-core
def k_core_filter(df: pl.DataFrame, k: int) -> tuple[pl.DataFrame, dict[str, int]]:
    """Iteratively drop users and items with fewer than ``k`` interactions until stable.

    Returns the filtered table (row order kept) and a report with the numbers removed.
    """
    before = {"users": df["user"].n_unique(), "items": df["item"].n_unique(), "interactions": df.height}
    rounds = 0
    if k and k > 1:
        while True:
            keep = (pl.len().over("user") >= k) & (pl.len().over("item") >= k)
            new = df.filter(keep)
            if new.height == df.height:
                break
            df, rounds = new, rounds + 1
    after = {"users": df["user"].n_unique(), "items": df["item"].n_unique(), "interactions": df.height}
    report = {
        "k": int(k or 0),
        "rounds": rounds,
        **after,
        "removed_users": before["users"] - after["users"],
        "removed_items": before["items"] - after["items"],
        "removed_interactions": before["interactions"] - after["interactions"],
    }
    if report["removed_interactions"]:
        log.warning(
            "%d-core filter (%d rounds) removed %d users, %d items, %d interactions; %d users, %d items, "
            "%d interactions remain",
            k,
            rounds,
            report["removed_users"],
            report["removed_items"],
            report["removed_interactions"],
            after["users"],
            after["items"],
            after["interactions"],
        )
    elif k and k > 1:
        log.info("%d-core filter removed nothing", k)
    return df, report


# ----------------------------------------------------------------------------- dispatch
def detect_format(path: str | Path, fmt: str = "auto") -> str:
    """Resolve ``fmt`` (``auto`` -> by suffix) to one of :data:`FORMATS`."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"{path}: unknown format {fmt!r} (choose auto, {', '.join(FORMATS)})")
        return fmt
    name = Path(path).name.lower()
    if name.endswith(".txt"):
        return "lines"
    if name.endswith(".inter"):
        return "inter"
    if name.endswith((".json", ".json.gz")):
        return "amazon"
    raise DataError(
        f"{path}: cannot tell the format from the suffix (.txt, .inter, .json, .json.gz); pass --format"
    )


def effective_k_core(fmt: str, k_core: int | None) -> int:
    """The k actually applied: ``None`` means the format's default, ``0`` means off."""
    if k_core is None:
        k_core = DEFAULT_K_CORE[fmt]
    if k_core is not None and k_core < 0:
        raise DataError(f"k_core must be >= 0, got {k_core}")
    return int(k_core or 0)


_READERS = {"lines": read_lines, "inter": read_inter, "amazon": read_amazon}


def read_interactions(path: str | Path, fmt: str = "auto", k_core: int | None = None) -> pl.DataFrame:
    """Read any supported format into the (user, item, order) table, then apply the k-core
    filter (``None``: the format's default, 5 for Amazon and off otherwise; ``0``: off)."""
    path = _check_file(Path(path))
    fmt = detect_format(path, fmt)
    k = effective_k_core(fmt, k_core)
    df = _READERS[fmt](path)
    if k > 1:
        df, _ = k_core_filter(df, k)
        if df.height == 0:
            raise DataError(f"{path}: no interactions left after {k}-core filtering")
    return df
