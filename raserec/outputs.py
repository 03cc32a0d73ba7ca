"""Output files are checked before the work that produces them: a run must not train or predict
for hours and then fail to write its result."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from raserec.errors import ConfigError


def check_output_file(path: str | Path, what: str, suffixes: Sequence[str] | None = None) -> Path:
    """Raise :class:`ConfigError` unless ``path`` can be written: an allowed suffix, not a
    directory, every existing ancestor a directory, and the nearest existing one writable
    (tried by creating and removing a temporary file, which also catches read-only mounts)."""
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{what} {str(path)!r} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} exists and is not writable")
    _check_writable_within(path.parent, what, path)
    return path


def check_output_dir(path: str | Path, what: str) -> Path:
    """Raise :class:`ConfigError` unless ``path`` is (or can be created as) a directory to write
    in: not a file, every existing ancestor a directory, the nearest existing one writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a directory")
    _check_writable_within(path, what, path)
    return path


def _check_writable_within(directory: Path, what: str, path: Path) -> None:
    """The nearest existing ancestor of ``directory`` (itself included) is a directory in which a
    file can be created (tried with a temporary file: also catches read-only mounts)."""
    ancestor = directory
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{what} {path}: {ancestor} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".raserec-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot write in {ancestor} ({exc.strerror or exc})") from exc


def cache_dir_option(value: str | None, option: str) -> str | None:
    """A ``--cache-dir``-style option: ``None`` for ``none`` (or empty: no cache), else the
    directory, checked to be writable (:func:`check_output_dir`)."""
    if value is None or value.strip().lower() in ("", "none"):
        return None
    check_output_dir(value, option)
    return value


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A fresh temporary file beside ``path`` to write to: when the block ends without error it
    replaces ``path`` in one step (a reader sees the old file or the new one, never half of one);
    otherwise it is removed.

    The name is unique per writer, so two processes filling the same cache entry at once (seeds
    run side by side, parallel test workers) never write into one file, as a fixed ``path.tmp``
    let them. It ends in ``path``'s own suffix because some writers (``np.save``) append theirs
    otherwise, and it gets the permissions a plain ``open`` would give (``mkstemp`` makes 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~umask())
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
