"""Coordinator checkpoints: everything needed to continue a federation after a crash.

One file, ``<output_dir>/checkpoint/checkpoint.safetensors``, rewritten atomically
(temp file, fsync, ``os.replace``) after every completed round, so a crash leaves
either the previous or the new checkpoint, never half of one. It holds

- the global model (tensors ``arrays/<name>``, key order kept in the metadata);
- the strategy's server-side state, layer by layer through wrappers
  (``inner`` of secure aggregation, ``strategy`` of Flower's DP wrappers):
  FedAdam/FedYogi/FedAdagrad ``m_t`` / ``v_t``, FedAvgM ``momentum_vector``,
  adaptive clipping's ``clipping_norm`` and any ``random.Random`` a layer keeps;
- the round reached, sites out of budget, node -> site names, the round history;
- the state of Python's ``random`` (Flower samples sites with it) and numpy's
  global generator, so the resumed rounds sample exactly as an uninterrupted run;
- the config it was made with: resuming under a different config is refused,
  except for keys that cannot change the model (``federation.rounds`` may grow).

Safetensors and JSON only: loading a checkpoint never executes code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedinfer.config.schema import FedInferConfig
from fedinfer.errors import ConfigError
from fedinfer.fl.loop import FederationState, RoundRecord
from fedinfer.fl.run_config import to_run_config
from fedinfer.fsutil import atomic_write_bytes

__all__ = ["CHECKPOINT_FILE", "Checkpoint", "checkpoint_path", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT_VERSION = 2  # 2: the global model's record stored packed, as it travels
_META = "fedinfer-checkpoint"
_ARRAY_STATE = ("m_t", "v_t", "momentum_vector")
_SCALAR_STATE = ("clipping_norm",)
# Run-config keys that may differ on resume: they change how or how long, never what is computed.
_MAY_CHANGE = ("federation.rounds", "federation.round-timeout-s", "secagg.timeout-s", "output-dir")
_MAY_CHANGE_GROUPS = ("simulation.", "serving.", "tracking.", "deployment.connect-timeout-s")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the federation state to continue from and the run it belongs to."""

    state: FederationState
    run_id: str


def checkpoint_path(output_dir: Path) -> Path:
    """Where the checkpoint of a run writing to ``output_dir`` lives."""
    return Path(output_dir) / "checkpoint" / CHECKPOINT_FILE


def _layers(strategy: Strategy) -> Iterator[Strategy]:
    """Yield the strategy and every strategy it wraps, outermost first."""
    layer: Any = strategy
    while isinstance(layer, Strategy):
        yield layer
        layer = getattr(layer, "inner", None) or getattr(layer, "strategy", None)


def _resumable_config(cfg: FedInferConfig) -> dict[str, Any]:
    return {
        k: v
        for k, v in sorted(to_run_config(cfg).items())
        if k not in _MAY_CHANGE and not k.startswith(_MAY_CHANGE_GROUPS)
    }


def save_checkpoint(
    output_dir: Path,
    *,
    cfg: FedInferConfig,
    state: FederationState,
    strategy: Strategy,
    run_id: str,
) -> Path:
    """Atomically write the checkpoint after a completed round; returns its path."""
    tensors: dict[str, np.ndarray] = {}
    # The global model's record as it is (packed, keys and dtypes kept): the strategy's
    # state (FedAdam's m_t ...) is keyed by the same record keys.
    record_keys = list(state.arrays.keys())
    for i, array in enumerate(state.arrays.values()):
        tensors[f"record/{i}"] = np.ascontiguousarray(array.numpy())
    layers = [_save_layer(i, layer, tensors) for i, layer in enumerate(_layers(strategy))]
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    tensors["rng/numpy"] = np.asarray(np_state[1], dtype=np.uint32)
    meta = {
        "format": FORMAT_VERSION,
        "run_id": run_id,
        "completed_round": state.completed_round,
        "exhausted_nodes": sorted(state.exhausted_nodes),
        "site_names": {str(k): v for k, v in state.site_names.items()},
        "history": [r.to_json() for r in state.history],
        "stop_reason": state.stop_reason,
        "array_record_keys": record_keys,
        "strategy": layers,
        "python_random": _jsonable_random_state(random.getstate()),
        "numpy_random": {
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "config": _resumable_config(cfg),
    }
    path = checkpoint_path(output_dir)
    _write_atomic(path, st_save(tensors, metadata={_META: json.dumps(meta, default=_json_default)}))
    return path


def _save_layer(index: int, layer: Strategy, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    saved: dict[str, Any] = {
        "class": type(layer).__name__,
        "arrays": {},
        "scalars": {},
        "randoms": {},
    }
    for attr in _ARRAY_STATE:
        value = getattr(layer, attr, None)
        if isinstance(value, dict):
            saved["arrays"][attr] = {"kind": "dict", "keys": list(value)}
            for i, key in enumerate(value):
                tensors[f"strategy/{index}/{attr}/{i}"] = np.ascontiguousarray(value[key])
        elif isinstance(value, list):
            saved["arrays"][attr] = {"kind": "list", "len": len(value)}
            for i, item in enumerate(value):
                tensors[f"strategy/{index}/{attr}/{i}"] = np.ascontiguousarray(item)
    for attr in _SCALAR_STATE:
        if isinstance(getattr(layer, attr, None), int | float):
            saved["scalars"][attr] = float(getattr(layer, attr))
    for attr, value in vars(layer).items():
        if isinstance(value, random.Random):
            saved["randoms"][attr] = _jsonable_random_state(value.getstate())
    return saved


def load_checkpoint(
    output_dir: Path, *, cfg: FedInferConfig, strategy: Strategy
) -> Checkpoint | None:
    """Load the checkpoint into a fresh state and restore ``strategy`` and the random generators.

    Returns ``None`` when ``output_dir`` has no checkpoint (no round completed yet).

    Raises
    ------
    ConfigError
        The checkpoint was made with a different config, or another strategy.
    """
    path = checkpoint_path(output_dir)
    if not path.exists():
        return None
    tensors = st_load(path.read_bytes())
    meta = _read_meta(path)
    _check_config(meta["config"], _resumable_config(cfg), path)
    layers = list(_layers(strategy))
    if [type(layer).__name__ for layer in layers] != [s["class"] for s in meta["strategy"]]:
        raise ConfigError(
            f"{path} was written by strategy {[s['class'] for s in meta['strategy']]}, not "
            f"{[type(layer).__name__ for layer in layers]}; resume with the original `strategy`"
        )
    for index, (layer, saved) in enumerate(zip(layers, meta["strategy"], strict=True)):
        _restore_layer(index, layer, saved, tensors)
    random.setstate(_random_state(meta["python_random"]))
    np_meta = meta["numpy_random"]
    np.random.set_state(
        ("MT19937", tensors["rng/numpy"], np_meta["pos"], np_meta["has_gauss"], np_meta["cached"])
    )
    return Checkpoint(state=_state_of(meta, tensors), run_id=str(meta["run_id"]))


def _read_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        raw = (fh.metadata() or {}).get(_META)
    if raw is None:
        raise ConfigError(f"{path} is not a fedinfer checkpoint; move it away to start afresh")
    meta: dict[str, Any] = json.loads(raw)
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(
            f"{path} has checkpoint format {meta.get('format')}; "
            f"this fedinfer reads {FORMAT_VERSION}: resume it with the fedinfer that wrote it, "
            "or move it away to start afresh"
        )
    return meta


def _check_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"`{k}`: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:10])
        raise ConfigError(
            f"cannot resume from {path}: the config changed ({details}); resume with the original "
            "config, or start a new run in a fresh output directory"
        )


def _restore_layer(
    index: int, layer: Strategy, saved: dict[str, Any], tensors: dict[str, np.ndarray]
) -> None:
    for attr, spec in saved["arrays"].items():
        if spec["kind"] == "dict":
            value: Any = {
                k: tensors[f"strategy/{index}/{attr}/{i}"] for i, k in enumerate(spec["keys"])
            }
        else:
            value = [tensors[f"strategy/{index}/{attr}/{i}"] for i in range(spec["len"])]
        setattr(layer, attr, value)
    for attr, scalar in saved["scalars"].items():
        setattr(layer, attr, scalar)
    for attr, state in saved["randoms"].items():
        getattr(layer, attr).setstate(_random_state(state))


def _global_arrays(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        OrderedDict(
            (key, Array(tensors[f"record/{i}"])) for i, key in enumerate(meta["array_record_keys"])
        )
    )


def _state_of(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> FederationState:
    known = {f.name for f in dataclasses.fields(RoundRecord)}
    return FederationState(
        arrays=_global_arrays(meta, tensors),
        completed_round=int(meta["completed_round"]),
        exhausted_nodes={int(n) for n in meta["exhausted_nodes"]},
        site_names={int(k): str(v) for k, v in meta["site_names"].items()},
        history=[
            RoundRecord(**{k: v for k, v in r.items() if k in known}) for r in meta["history"]
        ],
        stop_reason=meta["stop_reason"],
    )


def _jsonable_random_state(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state(saved: list[Any]) -> tuple[Any, ...]:
    return (saved[0], tuple(saved[1]), saved[2])


def _json_default(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable in a checkpoint: {type(value).__name__}")


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
