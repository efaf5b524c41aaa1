"""Secure-aggregation wire dicts <-> Flower records.

Flower record integers are signed 64-bit, while our site ids are Flower's
unsigned 64-bit node ids, so non-negative protocol integers travel in two's
complement. The one numpy array of an upload travels in an ArrayRecord.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

__all__ = ["config_to_wire", "wire_to_records"]

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def _signed(value: int) -> int:
    return value - _U64 if value > _I64_MAX else value


def _unsigned(value: int) -> int:
    return value + _U64 if value < 0 else value


_U64_KEYS = "__u64_keys"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def wire_to_records(wire: Mapping[str, Any]) -> tuple[ConfigRecord, ArrayRecord | None]:
    """Split a protocol wire dict into a ConfigRecord and, if it has arrays, an ArrayRecord."""
    config: dict[str, Any] = {}
    arrays: dict[str, Array] = {}
    unsigned: list[str] = []
    for key, value in wire.items():
        if isinstance(value, np.ndarray):
            arrays[key] = Array(value)
        elif _is_int(value) and value > _I64_MAX:
            config[key], unsigned = _signed(value), [*unsigned, key]
        elif (
            isinstance(value, list)
            and value
            and all(_is_int(v) for v in value)
            and max(value) > _I64_MAX
        ):
            config[key], unsigned = [_signed(v) for v in value], [*unsigned, key]
        else:
            config[key] = value
    if unsigned:
        config[_U64_KEYS] = unsigned
    return ConfigRecord(config), (ArrayRecord(arrays) if arrays else None)


def config_to_wire(config: ConfigRecord, arrays: ArrayRecord | None = None) -> dict[str, Any]:
    """Rebuild the protocol wire dict from :func:`wire_to_records` output."""
    unsigned = set(config.get(_U64_KEYS, []))  # type: ignore[arg-type]
    wire: dict[str, Any] = {}
    for key, value in config.items():
        if key == _U64_KEYS:
            continue
        if key in unsigned:
            wire[key] = (
                [_unsigned(int(v)) for v in value]
                if isinstance(value, list)
                else _unsigned(int(cast(int, value)))
            )
        else:
            wire[key] = value
    if arrays is not None:
        wire.update({key: array.numpy() for key, array in arrays.items()})
    return wire
