"""Loading a checkpoint never runs code: pickled payloads are refused by weights-only loading, an
encoder record may only name a SequenceEncoder from a trusted module (checked before importing),
and altered weights are caught by the recorded SHA-256. Each hostile file tries to create a marker
file; the marker must never appear."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from raserec.checkpoint import (
    RECORD_KEY,
    TRUSTED_ENCODER_MODULES,
    encoder_record,
    load_encoder,
    save_encoder,
    trust_encoder_module,
)
from raserec.errors import CheckpointError
from raserec.finetune.module import RAFTModule
from tests.test_memory_bank import tiny_encoder


class _Payload:
    """Unpickling this object runs ``os.system(f"touch {marker}")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _record_file(path: Path, **changes) -> Path:
    record = encoder_record(tiny_encoder(30), {"num_items": 30})
    record.update(changes)
    torch.save({RECORD_KEY: record}, path)
    return path


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({RECORD_KEY: _Payload(marker), "extra": _Payload(marker)}, hostile)
    with pytest.raises(CheckpointError, match="only plain weights are accepted"):
        load_encoder(hostile)
    with pytest.raises(CheckpointError, match="only plain weights"):
        RAFTModule(num_items=30, encoder_checkpoint=str(hostile))
    assert not marker.exists()


def test_a_class_path_outside_the_trusted_modules_is_refused_before_import(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "imported"
    package = tmp_path / "evilpkg"
    package.mkdir()
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Enc:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for class_path in ("os.system", "evilpkg.Enc", "builtins.eval"):
        path = _record_file(tmp_path / "record.pt", class_path=class_path, init_args={"command": f"touch {marker}"})
        with pytest.raises(CheckpointError, match="outside the trusted encoder modules"):
            load_encoder(path)
    assert not marker.exists() and "evilpkg" not in sys.modules


def test_a_trusted_module_object_that_is_not_an_encoder_is_refused(tmp_path: Path) -> None:
    path = _record_file(tmp_path / "record.pt", class_path="raserec.models.encoders.sasrec.PackedLayout",
                        init_args={})
    with pytest.raises(CheckpointError, match="not a SequenceEncoder subclass"):
        load_encoder(path)
    path = _record_file(tmp_path / "record2.pt", init_args={"num_items": 30, "hidden_size": [object.__name__]})
    with pytest.raises(CheckpointError, match="cannot be rebuilt"):
        load_encoder(path)


def test_altered_weights_are_detected(tmp_path: Path) -> None:
    path = save_encoder(tiny_encoder(30), tmp_path / "enc.pt", {"num_items": 30})
    encoder, _ = load_encoder(path)  # intact: loads
    blob = torch.load(path, weights_only=True)
    blob[RECORD_KEY]["state_dict"]["item_embedding.weight"][3, 5] += 0.25
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="do not match their recorded SHA-256"):
        load_encoder(path)
    raw = bytearray(save_encoder(encoder, tmp_path / "e2.pt").read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 200):  # 200 flipped bytes inside the weights
        raw[i] ^= 0xFF
    (tmp_path / "e2.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        load_encoder(tmp_path / "e2.pt")


def test_trusting_a_module_prefix(tmp_path: Path) -> None:
    before = list(TRUSTED_ENCODER_MODULES)
    try:
        trust_encoder_module("tests.")
        assert "tests." in TRUSTED_ENCODER_MODULES
        with pytest.raises(CheckpointError, match="not a module prefix"):
            trust_encoder_module("os; rm -rf")
    finally:
        TRUSTED_ENCODER_MODULES[:] = before


def test_the_cli_never_unpickles_a_hostile_ckpt_path(tmp_path: Path, capsys) -> None:
    from raserec.cli import main

    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _Payload(marker)}, hostile)
    config = Path(__file__).resolve().parents[1] / "configs" / "beauty_pretrain.yaml"
    for command in ("test", "fit", "predict"):
        assert main([command, "--config", str(config), "--ckpt_path", str(hostile)]) == 2
        err = capsys.readouterr().err
        assert "only plain weights are accepted" in err and err.count("\n") == 1
    assert not marker.exists()
