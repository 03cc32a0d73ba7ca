"""Self-describing encoder checkpoints: class path + init args + weights + data fingerprint.

The pre-training module embeds this record in every Lightning checkpoint it writes (key
``raserec_encoder``); :func:`load_encoder` accepts such a ``.ckpt`` or a standalone file saved
by :func:`save_encoder`, so the fine-tuning stage needs only the path.

Loading never runs code from the file: it is read with ``torch.load(weights_only=True)`` (plain
containers, numbers, strings and tensors only), the class it names is resolved only if its module
lies under a trusted prefix (checked on the name, before anything is imported) and must be a
:class:`SequenceEncoder` subclass, and the weights must match the SHA-256 recorded beside them.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from pathlib import Path
from typing import Any

import torch

from raserec.errors import CheckpointError
from raserec.models.encoders.base import SequenceEncoder
from raserec.outputs import replacing

log = logging.getLogger(__name__)

RECORD_KEY = "raserec_encoder"
FORMAT_VERSION = 1
#: Module prefixes an encoder record's ``class_path`` may name. A user's own encoder module is
#: added with :func:`trust_encoder_module` (or ``trusted_encoder_modules`` in a RAFT config).
TRUSTED_ENCODER_MODULES: list[str] = ["raserec.models.encoders."]


def trust_encoder_module(prefix: str) -> None:
    """Allow encoder records to name classes from modules starting with ``prefix`` (e.g. ``mypkg.encoders.``)."""
    if not prefix or prefix.startswith(".") or not all(part.isidentifier() for part in prefix.rstrip(".").split(".")):
        raise CheckpointError(f"not a module prefix: {prefix!r}")
    if prefix not in TRUSTED_ENCODER_MODULES:
        TRUSTED_ENCODER_MODULES.append(prefix)


def weights_sha256(state_dict: dict[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"encoder weights: {name} is a {type(tensor).__name__}, not a tensor")
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encoder_record(encoder: SequenceEncoder, data_fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to rebuild ``encoder`` without its training code. On the CPU its weights
    are views of the encoder's own (no copy): save or use the record before training on, or its
    recorded hash no longer matches the weights it holds."""
    missing = encoder.unrecorded_init_args()
    if missing:
        raise CheckpointError(f"{encoder.class_path} did not record its constructor argument(s) {missing}: call "
                              "self.record_init_args(locals()) in its __init__")
    # No copy: on the CPU the record shares storage with the module's own state_dict, so a Lightning
    # checkpoint that holds both (the record beside ``state_dict``) stores the encoder weights once.
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    return {
        "format_version": FORMAT_VERSION,
        "class_path": encoder.class_path,
        "init_args": dict(encoder.init_args),
        "state_dict": state,
        "weights_sha256": weights_sha256(state),
        "data": dict(data_fingerprint or {}),
    }


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file beside ``path``: a reader never sees a half-written
    file, and a failed save leaves nothing behind."""
    path = Path(path)
    with replacing(path) as tmp:
        torch.save(obj, tmp)
    return path


def save_encoder(encoder: SequenceEncoder, path: str | Path, data_fingerprint: dict[str, Any] | None = None) -> Path:
    """Write ``encoder``'s self-describing record (class, constructor arguments, weights, the
    training data's fingerprint) alone to ``path``: what fine-tuning and ``raserec test`` load."""
    return save_atomic({RECORD_KEY: encoder_record(encoder, data_fingerprint)}, path)


def read_record(path: str | Path) -> dict[str, Any]:
    """The encoder record stored in ``path`` (an encoder file or a Lightning checkpoint that
    carries one), loaded with ``weights_only``; ``CheckpointError`` when there is none."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    blob = load_weights_only(path)
    record = blob.get(RECORD_KEY) if isinstance(blob, dict) else None
    if record is None:
        raise CheckpointError(
            f"{path}: no encoder record ('{RECORD_KEY}'); was it written by raserec's pre-training stage?"
        )
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        found = record.get("format_version") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{path}: encoder record format {found} != {FORMAT_VERSION}")
    for key, kind in (("class_path", str), ("init_args", dict), ("state_dict", dict), ("data", dict)):
        if not isinstance(record.get(key), kind):
            raise CheckpointError(f"{path}: damaged encoder record ({key} is not a {kind.__name__})")
    expected = record.get("weights_sha256")
    if expected is None:
        log.warning("%s: encoder record without a weights hash (written before raserec recorded one); "
                    "its weights cannot be verified", path)
    elif weights_sha256(record["state_dict"]) != expected:
        raise CheckpointError(f"{path}: the encoder weights do not match their recorded SHA-256 "
                              "(the file is damaged or was altered)")
    return record


def load_weights_only(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: a pickle that would build any object
    other than plain containers, numbers, strings and tensors is refused, never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad (or hostile) file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: not a loadable checkpoint; only plain weights are accepted "
                              f"({type(exc).__name__}: {first[:200]})") from exc


def load_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    """:func:`load_weights_only`, and the result must look like a checkpoint: a dict whose
    ``state_dict`` (if any) maps names to tensors and whose ``hyper_parameters`` (if any) is a dict
    (one error line for a bare tensor, a list, ... instead of a crash wherever it is read)."""
    blob = load_weights_only(path)
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(blob).__name__}, not a dict of weights)")
    state = blob.get("state_dict", {})
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a checkpoint (its state_dict is not a mapping of tensors)")
    if not isinstance(blob.get("hyper_parameters", {}), dict):
        raise CheckpointError(f"{path}: not a checkpoint (its hyper_parameters are not a mapping)")
    return blob


def resolve_encoder_class(class_path: str) -> type[SequenceEncoder]:
    """The :class:`SequenceEncoder` subclass named by ``class_path``, if its module is trusted.
    The prefix is checked on the name before anything is imported."""
    module_name, _, cls_name = class_path.rpartition(".")
    if not module_name or not any(class_path.startswith(prefix) for prefix in TRUSTED_ENCODER_MODULES):
        raise CheckpointError(f"encoder class {class_path!r} is outside the trusted encoder modules "
                              f"({', '.join(TRUSTED_ENCODER_MODULES)}); refusing to import it "
                              "(trust your own module with trusted_encoder_modules)")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"encoder class {class_path} cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, SequenceEncoder)):
        raise CheckpointError(f"{class_path} is not a SequenceEncoder subclass; refusing to build it")
    return cls


def build_encoder(record: dict[str, Any]) -> SequenceEncoder:
    cls = resolve_encoder_class(record["class_path"])
    init_args = record["init_args"]
    if not all(isinstance(k, str) and _plain(v) for k, v in init_args.items()):
        raise CheckpointError(f"encoder {record['class_path']}: init_args must be plain values")
    try:
        encoder = cls(**init_args)
        encoder.load_state_dict(record["state_dict"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"encoder {record['class_path']} cannot be rebuilt from its record: {exc}") from exc
    return encoder


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def load_encoder(path: str | Path) -> tuple[SequenceEncoder, dict[str, Any]]:
    """Rebuild the encoder stored at ``path``; returns it with its data fingerprint."""
    record = read_record(path)
    try:
        return build_encoder(record), record["data"]
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load_encoder_for(path: str | Path, num_items: int | None) -> tuple[SequenceEncoder, dict[str, Any]]:
    """:func:`load_encoder`, refusing an encoder whose item table does not fit ``num_items``
    (the number of items of the data it is about to be used with; ``None`` skips the check)."""
    encoder, fingerprint = load_encoder(path)
    ckpt_items = encoder.item_embedding.num_embeddings - 1
    if num_items is not None and num_items != ckpt_items:
        raise CheckpointError(f"{path}: the encoder was trained on {ckpt_items} items, the data has {num_items}")
    return encoder, fingerprint


def state_fingerprint(encoder: SequenceEncoder) -> str:
    """Hash of the encoder's weights: identifies the encoder that built a memory bank."""
    h = hashlib.sha256(encoder.class_path.encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_same_data(fingerprint: dict[str, Any], datamodule: Any, allow_other_data: bool = False) -> None:
    """Refuse to use an encoder with data other than it was trained on (same item count, other
    interactions: the ids would silently mean other items). Data grown by
    ``append_interactions`` from the encoder's data is the same data; ``allow_other_data``
    turns the refusal into a warning."""
    expected = fingerprint.get("content_hash")
    if not expected or datamodule is None or not hasattr(datamodule, "data"):
        return
    current = datamodule.data.content_hash()
    if current == expected or expected in getattr(datamodule, "previous_content_hashes", ()):
        return
    message = (f"the encoder was pre-trained on other data (content hash {expected[:12]}) than "
               f"{getattr(datamodule, 'data_path', 'these data')} ({current[:12]})")
    if allow_other_data:
        log.warning("%s; continuing because allow_other_data is set", message)
        return
    raise CheckpointError(f"{message}; pass the data it was trained on, or allow_other_data: true to use it anyway")
