"""Exceptions that the CLI turns into a one-line message and a non-zero exit code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RaserecError(Exception):
    """Base class for user-facing errors (bad input, stale caches, wrong checkpoints)."""


class DataError(RaserecError):
    """Malformed, missing or inconsistent data. The message names the file (and line)."""


class CheckpointError(RaserecError):
    """A checkpoint or memory bank that does not match what it is used with."""


class ConfigError(RaserecError, ValueError):
    """An invalid setting (a parameter out of range, a bad config file or option), raised by
    validation before any work starts. Also a ``ValueError``, for callers that catch those."""


class TrainingError(RaserecError):
    """Training cannot go on (e.g. the loss turned non-finite); the message names the step."""


def check(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok`` (parameter validation)."""
    if not ok:
        raise ConfigError(message)


def check_optimizer(lr: float, weight_decay: float) -> None:
    """Adam's settings: a positive learning rate and a non-negative weight decay."""
    check(lr > 0, f"lr must be > 0, got {lr}")
    check(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")


def check_sizes(**sizes: int) -> None:
    """Every named size (hidden size, layers, heads, max_len, ...) is a positive integer."""
    for name, value in sizes.items():
        check(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")


def read_json_object(path: str | Path, what: str = "results file",
                     error: type[RaserecError] = RaserecError) -> dict[str, Any]:
    """A JSON file that must hold an object (a results file, a manifest): a damaged, foreign or
    non-UTF-8 file is one ``error`` naming ``path`` and ``what``, not a traceback of the parser."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: unreadable {what} ({type(exc).__name__})") from exc
    if not isinstance(record, dict):
        raise error(f"{path}: not a {what} (a JSON {type(record).__name__})")
    return record
