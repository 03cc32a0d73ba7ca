"""Item side information: text fields, categories and precomputed vectors, aligned with the
dataset's dense item ids.

Features are read from a JSON-lines file keyed by the *original* item id (``item``, as in
``../shared/data/<Dataset>.items.jsonl``), remapped with the same id map as the interactions
(:attr:`SequenceData.item_ids`), and cached as parquet under a key of (the dataset's content hash,
the feature file's sha256), so a changed dataset or file never reuses a stale cache. Items of the
data without a record, and records of items the data does not have, are counted and logged,
never silently dropped: the former get null fields (a defined "missing" value), the latter are
left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from raserec.data.prepare import file_sha256
from raserec.data.sequences import SequenceData
from raserec.errors import DataError
from raserec.outputs import replacing

log = logging.getLogger(__name__)

#: The column of a feature file that holds the original item id.
ID_COLUMN = "item"
_HAS_RECORD = "_has_record"  # stored beside the fields in the parquet cache


def dense_ids(original_ids: pl.Series | np.ndarray, data: SequenceData) -> np.ndarray:
    """The dense id (1..num_items) of each original item id, 0 where the data has no such item."""
    id_map = pl.DataFrame({ID_COLUMN: data.item_ids[1:].astype(str),
                           "_dense": np.arange(1, data.num_items + 1, dtype=np.int64)})
    keys = pl.DataFrame({ID_COLUMN: pl.Series(original_ids).cast(pl.Utf8)})
    return keys.join(id_map, on=ID_COLUMN, how="left", maintain_order="left")["_dense"].fill_null(0).to_numpy()


@dataclass
class ItemFeatures:
    """One row per dense item id ``0..num_items`` (row 0 = padding, all null).

    Attributes:
        table: polars frame with column ``item`` (dense id, equal to the row index) and one column
            per feature (strings, lists of strings, numbers; null where an item has no value).
        has_record: bool ``[num_items + 1]``: the item had a record in the feature file.
        vectors: named float32 matrices ``[num_items + 1, d]`` (row 0 and missing items zero).
        source: where the features came from (for logs and provenance).
    """

    table: pl.DataFrame
    has_record: np.ndarray
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    @property
    def num_items(self) -> int:
        return self.table.height - 1

    @property
    def fields(self) -> list[str]:
        return [c for c in self.table.columns if c != ID_COLUMN]

    @classmethod
    def load(cls, path: str | Path, data: SequenceData, cache_dir: str | Path | None = None) -> ItemFeatures:
        """Read ``path`` (JSON lines, one object per item with an ``item`` id) for ``data``."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such item feature file")
        digest = file_sha256(path)
        cached = None
        if cache_dir is not None:
            cached = Path(cache_dir) / f"item-features-{data.content_hash()[:16]}-{digest[:16]}.parquet"
            if cached.is_file():
                table = pl.read_parquet(cached)
                return cls(table.drop(_HAS_RECORD), table[_HAS_RECORD].to_numpy().astype(bool), source=str(path))
        try:
            raw = pl.read_ndjson(path, infer_schema_length=None)
        except Exception as exc:  # polars raises several error types for malformed JSON
            raise DataError(f"{path}: not a JSON-lines feature file ({type(exc).__name__}: {exc})") from exc
        features = cls.from_frame(raw, data, source=str(path))
        if cached is not None:
            with replacing(cached) as tmp:
                features.table.with_columns(pl.Series(_HAS_RECORD, features.has_record)).write_parquet(tmp)
        return features

    @classmethod
    def from_frame(cls, raw: pl.DataFrame, data: SequenceData, source: str = "") -> ItemFeatures:
        """Align a frame keyed by original item id (column ``item``) with ``data``'s dense ids."""
        if ID_COLUMN not in raw.columns:
            raise DataError(f"{source or 'item features'}: no {ID_COLUMN!r} column (the original item id)")
        raw = raw.with_columns(pl.col(ID_COLUMN).cast(pl.Utf8))
        if raw[ID_COLUMN].null_count():
            raise DataError(f"{source or 'item features'}: {raw[ID_COLUMN].null_count()} record(s) without an item id")
        duplicated = raw.height - raw[ID_COLUMN].n_unique()
        if duplicated:
            raise DataError(f"{source or 'item features'}: {duplicated} item id(s) appear more than once")
        joined = raw.with_columns(pl.Series("_dense", dense_ids(raw[ID_COLUMN], data)))
        unknown = int((joined["_dense"] == 0).sum())
        if unknown:
            log.info("%s: %d feature record(s) name items the data does not have; left out", source, unknown)
        joined = joined.filter(pl.col("_dense") > 0)
        frame = pl.DataFrame({"_dense": np.arange(data.num_items + 1, dtype=np.int64)}).join(
            joined.drop(ID_COLUMN), on="_dense", how="left").sort("_dense")
        has_record = np.zeros(data.num_items + 1, dtype=bool)
        has_record[joined["_dense"].to_numpy()] = True
        missing = data.num_items - int(has_record.sum())
        if missing:
            log.warning("%s: %d of %d items have no feature record; their fields are null", source, missing,
                        data.num_items)
        table = frame.rename({"_dense": ID_COLUMN})
        return cls(table, has_record, source=source)

    # ---------------------------------------------------------------- access
    def column(self, name: str) -> list:
        """Values of feature ``name`` for dense ids ``0..num_items`` (None where missing)."""
        if name not in self.table.columns or name == ID_COLUMN:
            raise DataError(f"no item feature {name!r}; available: {self.fields}")
        return self.table[name].to_list()

    def missing(self, name: str) -> int:
        """Number of real items without a value for ``name``."""
        return sum(v is None for v in self.column(name)[1:])

    def add_vectors(self, name: str, matrix: np.ndarray, original_ids: np.ndarray | None = None,
                    data: SequenceData | None = None) -> np.ndarray:
        """Store a ``[n, d]`` matrix as vectors ``name``: either already in dense-id order
        (``n == num_items + 1``) or keyed by ``original_ids`` (remapped with ``data``'s id map;
        items without a vector stay zero, counted in the log). Returns the aligned matrix."""
        matrix = np.asarray(matrix, dtype=np.float32)
        if matrix.ndim != 2:
            raise DataError(f"vectors {name!r} must be a 2-d matrix, got shape {matrix.shape}")
        if original_ids is None:
            if len(matrix) != self.num_items + 1:
                raise DataError(f"vectors {name!r}: {len(matrix)} rows for {self.num_items + 1} dense ids "
                                "(pass original_ids to remap)")
            aligned = matrix.copy()
        else:
            if data is None:
                raise DataError("remapping vectors by original id needs the dataset's id map (data)")
            aligned = np.zeros((self.num_items + 1, matrix.shape[1]), dtype=np.float32)
            rows = dense_ids(np.asarray(original_ids).astype(str), data)
            known = rows > 0
            aligned[rows[known]] = matrix[known]
            if int((~known).sum()):
                log.info("vectors %s: %d row(s) name items the data does not have; left out", name,
                         int((~known).sum()))
            without = self.num_items - len(set(rows[known].tolist()))
            if without:
                log.warning("vectors %s: %d of %d items have no vector; they are zero", name, without, self.num_items)
        aligned[0] = 0.0
        self.vectors[name] = aligned
        return aligned


def default_feature_path(data_path: str | Path) -> Path:
    """Where a dataset's item text lives by convention: ``<data file stem>.items.jsonl`` beside it."""
    data_path = Path(data_path)
    return data_path.with_name(f"{data_path.stem}.items.jsonl")
