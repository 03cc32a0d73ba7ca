"""Typed (dataclass) settings passed whole through LightningCLI and stored as plain dicts.

A module takes e.g. ``bank: BankConfig``; LightningCLI builds it from YAML (``--model.bank.k 30``,
``--help`` shows each field's attribute docstring) and the module stores ``asdict(config)`` in its
hyper-parameters, so a checkpoint holds only plain values (it loads with ``weights_only=True``)
and ``load_from_checkpoint`` passes the dict back, which :func:`coerce_config` turns into the
config again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

from raserec.errors import ConfigError

C = TypeVar("C")


def coerce_config(cls: type[C], value: C | Mapping[str, Any] | None) -> C:
    """``value`` as a ``cls`` config: an instance, a mapping of its fields, or ``None``
    (defaults). Unknown keys are a :class:`~raserec.errors.ConfigError` naming the known ones."""
    assert is_dataclass(cls)
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**value)
    raise ConfigError(f"expected a {cls.__name__} or a mapping of its fields, got {type(value).__name__}")
