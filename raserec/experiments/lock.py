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
import time
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
    """The pid that took experiment ``name``'s lock (``0`` if it did not say), ``None`` when no
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
        except OSError:  # a filesystem without flock: nothing can be held there
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _refused(name: str, doing: str, fd: int, path: Path) -> RaserecError:
    pid = _pid_in(fd)
    # the pid is the runner's; a `raserec fit` child that inherited the lock may outlive it
    return RaserecError(f"{name}: cannot {doing}: the experiment is running now ({f'started by pid {pid}, ' if pid else ''}"
                        f"lock {path}); one run per experiment (stop it first, or wait for it)")


def _flock(fd: int, how: int, path: Path, attempts: int = 5) -> bool:
    """Take the lock without blocking; retried briefly, since a read-only :func:`running` check
    holds it shared for an instant. ``False`` if another process holds it."""
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(0.1)
        except OSError as exc:
            raise RaserecError(f"{path}: cannot lock the experiment ({exc.strerror or exc})") from exc
    return False


@contextlib.contextmanager
def hold(runs_dir: Path, name: str) -> Iterator[int]:
    """Hold experiment ``name``'s lock for a run; yields the descriptor (pass it to the child
    processes that must keep the lock). Another holder is one :class:`RaserecError` line."""
    path = lock_path(runs_dir, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RaserecError(f"{path}: cannot create the experiment's lock ({exc.strerror or exc})") from exc
    try:
        if not _flock(fd, fcntl.LOCK_EX, path):
            raise _refused(name, "run", fd, path)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield fd
    finally:
        os.close(fd)  # releases the lock unless a child process still holds the descriptor


@contextlib.contextmanager
def idle(runs_dir: Path, name: str, doing: str) -> Iterator[None]:
    """Make sure no run of ``name`` is going for the block (a shared lock: creates nothing and
    needs no write access); one :class:`RaserecError` line if one is."""
    path = lock_path(runs_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield  # never locked: no run of this code is going
        return
    except OSError as exc:
        raise RaserecError(f"{path}: cannot read the experiment's lock ({exc.strerror or exc})") from exc
    try:
        if not _flock(fd, fcntl.LOCK_SH, path):
            raise _refused(name, doing, fd, path)
        yield
    finally:
        os.close(fd)


__all__ = ["hold", "idle", "lock_path", "running"]
