"""Prepared datasets: a versioned directory written once from a raw file and loaded fast.

Layout of a prepared directory::

    interactions.parquet   user:int32 (dense 0..U-1), item:int32 (dense 1..N), in CSR order
    users.parquet          user:int32 -> id:str (original user id)
    items.parquet          item:int32 (1..N) -> id:str (original item id)
    manifest.json          format_version, name, source, source_sha256, params, stats,
                           content_hash, dropped_users, created

Directories are written into a sibling temporary directory and renamed into place, so a
failed or interrupted run never leaves a half-written dataset behind. Loading recomputes the
content hash and refuses a directory whose arrays do not match its manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np
import polars as pl

from raserec.argparsing import ArgumentParser
from raserec.data.readers import (
    FORMATS,
    detect_format,
    download_amazon,
    effective_k_core,
    k_core_filter,
    read_interactions,
)
from raserec.data.sequences import SequenceData, dataset_stats, sequences_from_interactions
from raserec.errors import ConfigError, DataError, RaserecError
from raserec.outputs import umask

log = logging.getLogger(__name__)
_PROCESS_START = time.time()  # temporaries older than this and unlocked are left by dead runs

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FILES = ("interactions.parquet", "users.parquet", "items.parquet", MANIFEST)


# ----------------------------------------------------------------------------- helpers
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_prepared(path: str | Path) -> bool:
    """True for a directory written by :func:`prepare_dataset` (it has a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def _default_name(source: Path) -> str:
    name = source.name
    for suffix in (".gz", ".json", ".txt", ".inter"):
        name = name.removesuffix(suffix)
    m = re.fullmatch(r"reviews_(.+)_5", name)
    return m.group(1) if m else name


def _build(
    source: Path, fmt: str, k_core: int | None, min_length: int
) -> tuple[SequenceData, dict[str, Any]]:
    """Read, filter and build; returns the data and the provenance for the manifest."""
    fmt = detect_format(source, fmt)
    k = effective_k_core(fmt, k_core)
    df = read_interactions(source, fmt=fmt, k_core=0)
    k_report = None
    if k > 1:
        df, k_report = k_core_filter(df, k)
        if df.height == 0:
            raise DataError(f"{source}: no interactions left after {k}-core filtering")
    users_before = df["user"].n_unique()
    data = sequences_from_interactions(df, min_length=min_length, source=str(source))
    info = {
        "params": {"k_core": k, "min_length": min_length, "format": fmt},
        "k_core_report": k_report,
        "dropped_users": users_before - data.num_users,
    }
    return data, info


def _write(data: SequenceData, out: Path) -> None:
    users = np.repeat(np.arange(data.num_users, dtype=np.int32), data.lengths)
    pl.DataFrame({"user": users, "item": data.items.astype(np.int32)}).write_parquet(
        out / "interactions.parquet"
    )
    pl.DataFrame(
        {"user": np.arange(data.num_users, dtype=np.int32), "id": data.user_ids.astype(str)},
        schema={"user": pl.Int32, "id": pl.Utf8},
    ).write_parquet(out / "users.parquet")
    pl.DataFrame(
        {"item": np.arange(1, data.num_items + 1, dtype=np.int32), "id": data.item_ids[1:].astype(str)},
        schema={"item": pl.Int32, "id": pl.Utf8},
    ).write_parquet(out / "items.parquet")


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise DataError(f"{path}: not a prepared dataset directory")
    if not mpath.is_file():
        raise DataError(f"{path}: no {MANIFEST}; not a prepared dataset (re-run raserec prepare)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{mpath}: unreadable manifest ({exc}); re-run raserec prepare") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataError(
            f"{mpath}: format_version {got!r}, this raserec reads {FORMAT_VERSION}; re-run raserec prepare"
        )
    return manifest


# ----------------------------------------------------------------------------- prepare / load
def prepare_dataset(
    source: str | Path,
    out_dir: str | Path,
    fmt: str = "auto",
    k_core: int | None = None,
    min_length: int = 3,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a raw interaction file into a prepared directory at ``out_dir`` (atomically).

    An existing directory prepared from the same source bytes with the same parameters is
    reused as is; a different one is replaced only with ``overwrite=True``. A directory that is
    not a prepared dataset (and not empty) is never replaced.
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise DataError(f"{source}: no such file")
    if source.is_dir():
        raise DataError(f"{source}: is a directory, expected a raw interaction file")
    params = build_params(source, fmt=fmt, k_core=k_core, min_length=min_length)
    fmt_resolved = params["format"]
    source_sha = file_sha256(source)
    if out_dir.exists():
        _check_replaceable(out_dir, source_sha, params, overwrite)
        if _same_dataset(out_dir, source_sha, params):
            log.info("%s: already prepared from %s with the same parameters", out_dir, source)
            return out_dir

    data, info = _build(source, fmt_resolved, k_core, min_length)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name or _default_name(source),
        "source": str(source.resolve()),
        "source_sha256": source_sha,
        "params": info["params"],
        "stats": dataset_stats(data),
        "content_hash": data.content_hash(),
        "dropped_users": info["dropped_users"],
        "k_core_report": info["k_core_report"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(out_dir.parent)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    lock = _hold_lock(tmp)  # tells a later sweep that this directory is still being written
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700; the dataset should be shareable
    old: Path | None = None
    try:
        _write(data, tmp)
        if hold := float(os.environ.get("RASEREC_PREPARE_HOLD_S", "0") or 0):
            time.sleep(hold)  # test hook: widen the window in which a test interrupts the write
        _write_manifest(tmp, manifest)  # last: a directory with a manifest is complete
        if out_dir.exists():
            if _same_dataset(out_dir, source_sha, params):  # a concurrent run finished first
                return out_dir
            _check_replaceable(out_dir, source_sha, params, overwrite)
            # Move the old directory aside rather than deleting it first, so a failure here
            # leaves either the old or the new dataset in place, never neither.
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "d")
        os.replace(tmp, out_dir)
    except BaseException:
        with _signals_deferred():
            if old is not None and not out_dir.exists() and (old / "d").exists():
                os.replace(old / "d", out_dir)
        raise
    finally:
        # A second Ctrl-C must not cut the cleanup short (it used to leave .NAME.tmp-* behind):
        # SIGINT/SIGTERM are held until it is done, then delivered.
        with _signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            lock.close()
            Path(f"{tmp}.lock").unlink(missing_ok=True)
    log.info("prepared %s -> %s (%s)", source, out_dir, manifest["stats"])
    return out_dir


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM for the duration (delivered right after), so cleanup completes."""
    blockable = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if blockable:
        signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        if blockable:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED)


def _hold_lock(tmp: Path):
    """An exclusive ``flock`` on ``<tmp>.lock``, held while ``tmp`` is written; the kernel drops
    it when the process dies, however it dies."""
    handle = open(f"{tmp}.lock", "w")  # noqa: SIM115 - held open until the write is over
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def sweep_stale_temporaries(directory: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` directories left in ``directory`` by a prepare that
    was killed: those older than this process whose lock no live process holds. Returns them."""
    removed = []
    started = _PROCESS_START
    for candidate in list(directory.glob(".*.tmp-*")) + list(directory.glob(".*.old-*")):
        if not candidate.is_dir():
            continue
        try:
            if candidate.stat().st_mtime >= started:
                continue  # made after this process started: possibly a sibling thread's
            lock_path = Path(f"{candidate}.lock")
            with open(lock_path, "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another process is writing it right now
                shutil.rmtree(candidate, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            removed.append(candidate)
        except OSError as exc:
            log.warning("%s: could not remove a stale temporary directory (%s)", candidate, exc)
    if removed:
        log.info("removed %d stale temporary director%s left by an interrupted prepare: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", ", ".join(p.name for p in removed))
    return removed


def _same_dataset(out_dir: Path, source_sha: str, params: dict[str, Any]) -> bool:
    if not is_prepared(out_dir):
        return False
    try:
        m = read_manifest(out_dir)
    except DataError:
        return False
    return (
        m.get("source_sha256") == source_sha
        and m.get("params") == params
        and all((out_dir / f).is_file() for f in _FILES)
    )


def _check_replaceable(out_dir: Path, source_sha: str, params: dict[str, Any], overwrite: bool) -> None:
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    if _same_dataset(out_dir, source_sha, params):
        return
    if is_prepared(out_dir):
        if not overwrite:
            raise DataError(
                f"{out_dir}: holds a different prepared dataset (other source or parameters); "
                "pass --overwrite to replace it"
            )
        return
    if any(out_dir.iterdir()):
        # Never delete a directory we did not write, even with overwrite: a typo in OUT_DIR
        # must not wipe unrelated files.
        raise DataError(
            f"{out_dir}: exists, is not empty and is not a prepared dataset; choose another OUT_DIR"
        )


def load_prepared(path: str | Path, verify: bool = True) -> SequenceData:
    """Load a prepared directory; with ``verify`` the content hash must match the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for f in _FILES:
        if not (path / f).is_file():
            raise DataError(f"{path}: missing {f}; re-run raserec prepare")
    try:
        inter = pl.read_parquet(path / "interactions.parquet")
        users = pl.read_parquet(path / "users.parquet")
        items = pl.read_parquet(path / "items.parquet")
    except Exception as exc:  # polars raises several types for corrupt parquet
        raise DataError(
            f"{path}: unreadable parquet ({type(exc).__name__}: {exc}); re-run raserec prepare"
        ) from None
    for df, cols, f in (
        (inter, ("user", "item"), "interactions.parquet"),
        (users, ("user", "id"), "users.parquet"),
        (items, ("item", "id"), "items.parquet"),
    ):
        if tuple(df.columns) != cols:
            raise DataError(
                f"{path / f}: columns {df.columns}, expected {list(cols)}; re-run raserec prepare"
            )
    num_users, num_items = users.height, items.height
    u = inter["user"].to_numpy()
    it = inter["item"].to_numpy()
    if (
        not np.array_equal(users["user"].to_numpy(), np.arange(num_users))
        or not np.array_equal(items["item"].to_numpy(), np.arange(1, num_items + 1))
        or (len(u) and (u.min() < 0 or u.max() >= num_users or np.any(np.diff(u) < 0)))
        or (len(it) and (it.min() < 1 or it.max() > num_items))
    ):
        raise DataError(
            f"{path}: inconsistent prepared files (ids out of range or not in CSR order); "
            "re-run raserec prepare"
        )
    offsets = np.concatenate([[0], np.cumsum(np.bincount(u, minlength=num_users))]).astype(np.int64)
    data = SequenceData(
        offsets=offsets,
        items=it.astype(np.int32),
        user_ids=np.asarray(users["id"].to_list(), dtype=object),
        item_ids=np.asarray([""] + items["id"].to_list(), dtype=object),
    )
    if verify and data.content_hash() != manifest.get("content_hash"):
        raise DataError(
            f"{path}: cache content hash mismatch (files were modified or are corrupt); "
            "delete the directory and re-run raserec prepare"
        )
    return data


class BuildOptions(TypedDict, total=False):
    """How a raw file becomes sequences (the keyword arguments of :func:`build_params`)."""

    fmt: str
    k_core: int | None
    min_length: int


def build_params(source: Path, fmt: str = "auto", k_core: int | None = None, min_length: int = 3) -> dict[str, Any]:
    """The effective build parameters (format detected, the format's default k-core applied): what
    a manifest records and a cache entry is keyed on."""
    fmt_resolved = detect_format(source, fmt)
    return {"k_core": effective_k_core(fmt_resolved, k_core), "min_length": min_length, "format": fmt_resolved}


def cache_entry(source: str | Path, cache_dir: str | Path, **options: Unpack[BuildOptions]) -> Path:
    """The cache directory for ``source`` and these parameters.

    Keyed on the source *bytes* and the effective parameters, never on the path alone: an
    edited file or a different k-core gets a fresh entry instead of a stale one.
    """
    source = Path(source)
    params = {"format_version": FORMAT_VERSION, **build_params(source, **options)}
    h = hashlib.sha256()
    h.update(file_sha256(source).encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    stem = _default_name(source)
    return Path(cache_dir) / f"{stem}-{h.hexdigest()[:16]}"


def load_dataset(
    path: str | Path,
    cache_dir: str | Path | None = None,
    fmt: str = "auto",
    k_core: int | None = None,
    min_length: int = 3,
) -> SequenceData:
    """Load a prepared directory or a raw file (through the cache when ``cache_dir`` is set)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        return load_prepared(path)
    if cache_dir is None:
        data, _ = _build(path, fmt, k_core, min_length)
        return data
    entry = cache_entry(path, cache_dir, fmt=fmt, k_core=k_core, min_length=min_length)
    if not is_prepared(entry):
        prepare_dataset(path, entry, fmt=fmt, k_core=k_core, min_length=min_length, overwrite=True)
    else:
        log.info("%s: using cached %s", path, entry)
    return load_prepared(entry)


def dataset_stats_for(
    path: str | Path, fmt: str = "auto", k_core: int | None = None, min_length: int = 3
) -> dict[str, float]:
    """Table-5 statistics (users, items, interactions, avg_length, sparsity) of a raw file or a
    prepared directory (read from its manifest)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        load_prepared(path, verify=True)  # never report figures of files that no longer match them
        stats = read_manifest(path).get("stats")
        if not isinstance(stats, dict):
            raise DataError(f"{path / MANIFEST}: no stats; re-run raserec prepare")
    else:
        data, _ = _build(path, fmt, k_core, min_length)
        stats = dataset_stats(data)
    keys = ("users", "items", "interactions", "avg_length", "sparsity")
    missing = [k for k in keys if k not in stats]
    if missing:
        raise DataError(f"{path / MANIFEST}: stats lack {missing}; re-run raserec prepare")
    return {k: stats[k] for k in keys}


# ----------------------------------------------------------------------------- CLI
def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code: 0 after ``--help``, 2 after a usage error (one
    ``error:`` line, see :class:`raserec.argparsing.ArgumentParser`)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    except ConfigError as exc:
        return _fail(exc)


def _fail(exc: RaserecError) -> int:
    lines = str(exc).splitlines() or [repr(exc)]
    print(f"error: {lines[0]}", file=sys.stderr)
    return 2


def _fmt_stats_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    header = ("dataset", "#users", "#items", "#inters", "avg. length", "sparsity")
    body = [
        (
            name,
            f"{s['users']:,}",
            f"{s['items']:,}",
            f"{s['interactions']:,}",
            f"{s['avg_length']:.2f}",
            f"{100 * s['sparsity']:.2f}%",
        )
        for name, s in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *body]
    ]
    return "\n".join(lines)


def _k_core_arg(value: str) -> int:
    k = int(value)
    if k < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return k


def prepare_main(argv: list[str]) -> int:
    """``raserec prepare SOURCE OUT_DIR``; returns the exit code."""
    parser = ArgumentParser(
        prog="raserec prepare",
        description="Convert a raw interaction file into a prepared dataset directory "
        "(parquet + manifest with a content hash).",
    )
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="raw file (.txt lines, .inter RecBole, .json/.json.gz Amazon) or amazon:<Category>",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    parser.add_argument(
        "--k-core",
        type=_k_core_arg,
        default=None,
        help="iterative k-core filter (default: 5 for Amazon, off otherwise; 0 = off)",
    )
    parser.add_argument(
        "--min-length",
        type=int,
        default=3,
        help="drop users with fewer interactions (default 3, the leave-one-out minimum)",
    )
    parser.add_argument("--name", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace a different prepared dataset")
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    try:
        if args.min_length < 3:
            raise DataError(f"--min-length must be >= 3 for leave-one-out splits, got {args.min_length}")
        fmt = args.format
        source = args.source
        if source.startswith("amazon:"):
            source = download_amazon(source.split(":", 1)[1], args.out_dir.resolve().parent / ".raw")
            fmt = "amazon" if fmt == "auto" else fmt
        out = prepare_dataset(
            Path(source),
            args.out_dir,
            fmt=fmt,
            k_core=args.k_core,
            min_length=args.min_length,
            name=args.name,
            overwrite=args.overwrite,
        )
        manifest = read_manifest(out)
    except DataError as exc:
        return _fail(exc)
    print(f"prepared {manifest['name']} -> {out}")
    print(_fmt_stats_table([(manifest["name"], manifest["stats"])]))
    report = manifest.get("k_core_report")
    if report:
        print(
            f"{report['k']}-core: removed {report['removed_users']:,} users, {report['removed_items']:,} items, "
            f"{report['removed_interactions']:,} interactions in {report['rounds']} rounds"
        )
    print(f"dropped users (< {manifest['params']['min_length']} interactions): {manifest['dropped_users']:,}")
    print(f"content hash: {manifest['content_hash']}")
    return 0


def stats_main(argv: list[str]) -> int:
    """``raserec stats PATH [PATH ...] [--json]``; returns the exit code."""
    parser = ArgumentParser(
        prog="raserec stats",
        description="Dataset statistics as in the paper's Table 5 (raw file or prepared directory).",
    )
    parser.add_argument("paths", metavar="PATH", nargs="+", type=Path)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per path (sparsity as a fraction)"
    )
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    parser.add_argument("--k-core", type=_k_core_arg, default=None)
    parser.add_argument("--min-length", type=int, default=3)
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    rows = []
    try:
        for p in args.paths:
            stats = dataset_stats_for(p, fmt=args.format, k_core=args.k_core, min_length=args.min_length)
            name = read_manifest(p).get("name", p.name) if p.is_dir() else _default_name(p)
            rows.append((str(name), stats))
    except DataError as exc:
        return _fail(exc)
    if args.json:
        for _, s in rows:
            print(json.dumps(s))
    else:
        print(_fmt_stats_table(rows))
    return 0
