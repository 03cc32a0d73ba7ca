"""Self-describing encoder checkpoints: class path + init args + weights + data fingerprint.

The pre-training module embeds this record in every Lightning checkpoint it writes (key
``raserec_encoder``); :func:`load_encoder` accepts such a ``.ckpt`` or a standalone file saved
by :func:`save_encoder`, so the fine-tuning stage needs only the path.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import torch

from raserec.errors import CheckpointError
from raserec.models.encoders.base import SequenceEncoder

RECORD_KEY = "raserec_encoder"
FORMAT_VERSION = 1


def encoder_record(encoder: SequenceEncoder, data_fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to rebuild ``encoder`` without its training code."""
    return {
        "format_version": FORMAT_VERSION,
        "class_path": encoder.class_path,
        "init_args": dict(encoder.init_args),
        "state_dict": {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()},
        "data": dict(data_fingerprint or {}),
    }


def save_encoder(encoder: SequenceEncoder, path: str | Path, data_fingerprint: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({RECORD_KEY: encoder_record(encoder, data_fingerprint)}, tmp)
    tmp.replace(path)
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    record = blob.get(RECORD_KEY) if isinstance(blob, dict) else None
    if record is None:
        raise CheckpointError(
            f"{path}: no encoder record ('{RECORD_KEY}'); was it written by raserec's pre-training stage?"
        )
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: encoder record format {record.get('format_version')} != {FORMAT_VERSION}")
    return record


def build_encoder(record: dict[str, Any]) -> SequenceEncoder:
    module_name, _, cls_name = record["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"encoder class {record['class_path']} cannot be imported: {exc}") from exc
    encoder = cls(**record["init_args"])
    encoder.load_state_dict(record["state_dict"])
    return encoder


def load_encoder(path: str | Path) -> tuple[SequenceEncoder, dict[str, Any]]:
    """Rebuild the encoder stored at ``path``; returns it with its data fingerprint."""
    record = read_record(path)
    return build_encoder(record), record["data"]


def load_encoder_for(path: str | Path, num_items: int | None) -> tuple[SequenceEncoder, dict[str, Any]]:
    """:func:`load_encoder`, refusing an encoder whose item table does not fit ``num_items``
    (the number of items of the data it is about to be used with; ``None`` skips the check)."""
    encoder, fingerprint = load_encoder(path)
    ckpt_items = encoder.item_embedding.num_embeddings - 1
    if num_items is not None and num_items != ckpt_items:
        raise CheckpointError(f"{path}: the encoder was trained on {ckpt_items} items, the data has {num_items}")
    return encoder, fingerprint


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_fingerprint(encoder: SequenceEncoder) -> str:
    """Hash of the encoder's weights: identifies the encoder that built a memory bank."""
    h = hashlib.sha256(encoder.class_path.encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
