"""One run per experiment: an exclusive ``flock`` on ``runs/<name>/.lock``.

Two ``raserec experiment`` processes of one name would train the same seed into the same
``runs/`` directory and overwrite each other's checkpoints and results. The runner holds this
lock while it runs, and every ``raserec fit`` child inherits the descriptor, so the lock lasts as
long as a trainer of the experiment is alive, even if the runner alone is killed. The lock is the
kernel's: it goes with the last process holding it, so a crash leaves no stale lock (the file
itself stays, harmless, in ``runs/``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from raserec.errors import RaserecError


def lock_path(runs_dir: Path, name: str) -> Path:
    return runs_dir / name / ".lock"


def _pid_in(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 32).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def running(runs_dir: Path, name: str) -> int | None:
    """The pid that holds experiment ``name``'s lock (``0`` if it did not say), ``None`` when no
    process holds it. Read-only: creates nothing."""
    path = lock_path(runs_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(runs_dir: Path, name: str, doing: str = "run") -> Iterator[int]:
    """Hold experiment ``name``'s lock for the block; yields the descriptor (pass it to child
    processes that must keep the lock). Another holder is one :class:`RaserecError` line."""
    path = lock_path(runs_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            raise RaserecError(f"{name}: cannot {doing}: the experiment is running now "
                               f"({f'pid {pid}, ' if pid else ''}lock {path}); one run per experiment "
                               "(stop it first, or wait for it)") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield fd
    finally:
        os.close(fd)  # releases the lock unless a child process still holds the descriptor


__all__ = ["hold", "lock_path", "running"]
