"""Item and user text, without an LLM: the sources and the ``template`` renderings.

Sources of item text (all keyed by the dataset's *original* item ids, remapped to dense ids):

- ``<data>.items.jsonl`` (``../shared/data``): ``title_keywords``, ``categories``, ``brand``;
- a RecBole atomic ``.item`` file (``item_id:token`` plus e.g. ``title:token_seq``);
- Amazon 2014 metadata ``meta_<Category>.json(.gz)`` (one record per line, JSON or the original
  Python-literal form), joined by ASIN through the ``asin`` column of ``<data>.items.jsonl``.

``render_items`` turns each item's fields into one line, e.g. ``"title: red shatter crackle nail
polish e55; categories: Makeup > Nails > Nail Polish; brand: OPI"``. Items without any of the
fields get the empty string (a zero vector after embedding: no neighbours, never a neighbour),
counted in the log, never dropped. A user prefix's text is its items' titles, oldest first,
joined by ``"; "`` (SRA-CL's user prompt without the LLM).
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from raserec.data.features import ID_COLUMN, ItemFeatures, default_feature_path
from raserec.data.sequences import SequenceData
from raserec.errors import DataError

log = logging.getLogger(__name__)

#: Fields rendered by default, in order, with the label they get in the text (the first present
#: title-like field is also an item's title in user texts).
DEFAULT_FIELDS: tuple[tuple[str, str], ...] = (("title", "title"), ("title_keywords", "title"),
                                                ("categories", "categories"), ("brand", "brand"),
                                                ("price", "price"), ("description", "description"))
_TITLE_FIELDS = ("title", "title_keywords")
#: Characters of a description kept (SRA-CL's item prompt: 500).
DESCRIPTION_CHARS = 500


def _value_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        flat = [v for item in value for v in (item if isinstance(item, (list, tuple)) else [item])]
        return " > ".join(str(v) for v in flat if v is not None)
    return str(value).strip()


def render_items(features: ItemFeatures, fields: Sequence[tuple[str, str]] = DEFAULT_FIELDS) -> list[str]:
    """One text per dense item id ``0..num_items`` (``[0]``, padding, is ``""``), from the
    ``fields`` (feature name, label) that the features have; at least one must exist."""
    present = [(name, label) for name, label in fields if name in features.fields]
    if not present:
        raise DataError(f"{features.source or 'item features'}: none of the text fields "
                        f"{[name for name, _ in fields]} exists (fields: {features.fields})")
    columns = [(label, features.column(name)) for name, label in present]
    texts = []
    for i in range(features.num_items + 1):
        parts = [f"{label}: {text[:DESCRIPTION_CHARS]}" for label, col in columns if (text := _value_text(col[i]))]
        texts.append("; ".join(parts) if i else "")
    empty = sum(1 for t in texts[1:] if not t)
    if empty:
        log.warning("%s: %d of %d items have no text in %s; they get an empty text (zero vector, no neighbours)",
                    features.source, empty, features.num_items, [name for name, _ in present])
    return texts


def item_titles(features: ItemFeatures, texts: Sequence[str]) -> list[str]:
    """Each item's title for user texts: the first title-like field, else its whole text."""
    for name in _TITLE_FIELDS:
        if name in features.fields:
            column = features.column(name)
            return [_value_text(v) or t for v, t in zip(column, texts, strict=True)]
    return list(texts)


def prefix_texts(titles: Sequence[str], windows: np.ndarray) -> list[str]:
    """The text of each left-padded prefix window ``[P, W]`` of item ids: titles, oldest first."""
    titles = np.asarray(titles, dtype=object)
    return ["; ".join(t for t in titles[row[row > 0]] if t) for row in windows]


# ------------------------------------------------------------------ sources
def _recbole_items(path: Path) -> pl.DataFrame:
    try:
        raw = pl.read_csv(path, separator="\t", quote_char=None, infer_schema_length=0)
    except Exception as exc:  # polars raises several error types for malformed files
        raise DataError(f"{path}: not a RecBole .item file ({type(exc).__name__}: {exc})") from exc
    raw = raw.rename({c: c.split(":", 1)[0] for c in raw.columns})
    if "item_id" not in raw.columns:
        raise DataError(f"{path}: no item_id column (columns: {raw.columns})")
    return raw.rename({"item_id": ID_COLUMN})


def _amazon_meta(path: Path, asin_map: Path) -> pl.DataFrame:
    if not asin_map.is_file():
        raise DataError(f"{path}: Amazon metadata is joined by ASIN through {asin_map}, which does not exist")
    items = pl.read_ndjson(asin_map, infer_schema_length=None)
    if "asin" not in items.columns:
        raise DataError(f"{asin_map}: no asin column to join {path.name} by")
    records = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                try:  # the 2014 dumps are Python literals; literal_eval never runs code
                    record = ast.literal_eval(line)
                except (ValueError, SyntaxError) as exc:
                    raise DataError(f"{path}:{number}: not a metadata record") from exc
            records.append({"asin": record.get("asin"), "title": record.get("title"),
                            "brand": record.get("brand"),
                            "categories": _value_text((record.get("categories") or [[]])[0]) or None,
                            "price": None if record.get("price") is None else str(record.get("price")),
                            "description": record.get("description")})
    meta = pl.DataFrame(records, schema={k: pl.Utf8 for k in ("asin", "title", "brand", "categories", "price",
                                                               "description")})
    joined = items.select(ID_COLUMN, "asin").join(meta.unique("asin", keep="first"), on="asin", how="inner")
    log.info("%s: %d of %d items found by ASIN", path.name, joined.height, items.height)
    return joined.drop("asin")


def item_text_path(source: str | Path | None, data_path: str | Path) -> Path:
    """The item text file ``source`` names (``None``/``auto``: ``<data>.items.jsonl`` beside the
    data); a missing file is a one-line ``DataError`` naming it (checked before any long work)."""
    default = default_feature_path(data_path)
    path = default if source in (None, "auto") else Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no item text for this dataset (semantic methods need item text: "
                        f"{default.name} beside the data, a RecBole .item file or Amazon meta_*.json)")
    return path


def load_item_text(source: str | Path | None, data_path: str | Path, data: SequenceData,
                   cache_dir: str | Path | None = None) -> ItemFeatures:
    """Item text fields for ``data`` from ``source`` (see :func:`item_text_path`)."""
    default = default_feature_path(data_path)
    path = item_text_path(source, data_path)
    name = path.name
    if name.endswith(".item"):
        return ItemFeatures.from_frame(_recbole_items(path), data, source=str(path))
    if name.startswith("meta_") and (name.endswith(".json") or name.endswith(".json.gz")):
        return ItemFeatures.from_frame(_amazon_meta(path, default), data, source=str(path))
    return ItemFeatures.load(path, data, cache_dir=cache_dir)
