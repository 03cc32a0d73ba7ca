"""Reads an offline W&B run file (``run-*.wandb``, a LevelDB-style record log) for tests."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7


def records(path: str | Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    buf = Path(path).read_bytes()
    pos, pending, out = _HEADER, b"", []
    while pos + _HEADER <= len(buf):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", buf[pos : pos + _HEADER])
        if kind == 0 and length == 0:
            pos += left  # zero padding to the end of the block
            continue
        data = buf[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # FULL or LAST: a complete record
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def finished_records(path: str | Path, timeout_s: float = 120.0) -> list[Any]:
    """The run file's records once it holds the run's ``exit`` record. ``wandb.finish()`` can
    return before the W&B service has written the last records (seen on a loaded machine: the
    file then lacked the validation history), and records are written in order, so everything
    logged precedes ``exit``."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = records(path)
        if any(rec.WhichOneof("record_type") == "exit" for rec in out) or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def logged(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(last value of every history key, run config) of a finished offline run."""
    history: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for rec in finished_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                history[key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return history, config
