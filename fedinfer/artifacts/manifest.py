"""The model manifest: what a signed artifact says about its weights.

``manifest.json`` is plain JSON (never code). The signature covers the
*canonical* form of every field except ``signature`` itself: UTF-8 JSON with
sorted keys, no whitespace and no NaN/Infinity, so any verifier in any language
can rebuild the exact signed bytes. Non-finite numbers in metrics or privacy
dicts (an epsilon of ``inf`` when DP is off) are written as the strings
``"inf"``, ``"-inf"`` and ``"nan"``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedinfer.errors import ConfigError, ModelIntegrityError

__all__ = [
    "MANIFEST_FORMAT",
    "ModelManifest",
    "TensorSpec",
    "canonical_json",
    "jsonable",
]

MANIFEST_FORMAT = "fedinfer-model/1"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor in Open Inference Protocol terms.

    ``shape`` uses -1 for the variable batch dimension; ``datatype`` is an OIP
    datatype name such as ``"FP32"``.
    """

    name: str
    shape: tuple[int, ...]
    datatype: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as in OIP model metadata."""
        return {"name": self.name, "shape": list(self.shape), "datatype": self.datatype}

    @classmethod
    def from_dict(cls, data: Any) -> TensorSpec:
        """Parse the JSON form; raise :class:`ModelIntegrityError` if malformed."""
        _require(isinstance(data, dict), "tensor spec must be an object")
        name, shape, dtype = data.get("name"), data.get("shape"), data.get("datatype")
        _require(isinstance(name, str) and bool(name), "tensor spec needs a string 'name'")
        _require(
            isinstance(shape, list) and all(type(d) is int for d in shape),
            "tensor spec 'shape' must be a list of integers",
        )
        _require(isinstance(dtype, str), "tensor spec needs a string 'datatype'")
        return cls(name=name, shape=tuple(shape), datatype=dtype)


@dataclass(frozen=True)
class ModelManifest:
    """Parsed ``manifest.json`` of a model artifact (see the module docstring)."""

    name: str
    version: int
    server_round: int
    created: str
    """UTC ISO-8601 time the artifact was written."""
    model: dict[str, Any]
    """The :class:`~fedinfer.config.schema.ModelConfig` as a dict."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights_sha256: str
    run_id: str
    metrics: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    class_labels: tuple[str, ...] | None = None
    task: dict[str, Any] | None = None
    """The learning task (:mod:`fedinfer.tasks`): ``{"kind": "regression", "num_classes": 1,
    ...}``; None (artifacts written before tasks existed): multiclass. Signed when present."""
    weights_file: str = "weights.safetensors"
    format: str = MANIFEST_FORMAT
    signature: dict[str, str] | None = None
    """``{"algorithm": "ed25519", "key_id": ..., "value": base64}``; None if unsigned."""

    @property
    def input_dim(self) -> int:
        """Features per sample: the product of the single input's non-batch dimensions."""
        return math.prod(self.inputs[0].shape[1:])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape, e.g. ``(1, 8, 8)`` (``(input_dim,)`` for flat models)."""
        return tuple(self.inputs[0].shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of logits (the last dimension of the single output)."""
        return self.outputs[0].shape[-1]

    @property
    def task_kind(self) -> str:
        """``multiclass``, ``binary``, ``multilabel`` or ``regression``."""
        return str((self.task or {}).get("kind", "multiclass"))

    @property
    def threshold(self) -> float:
        """Decision threshold on probabilities (binary, multilabel; default 0.5)."""
        return float((self.task or {}).get("threshold", 0.5))

    def to_dict(self, *, with_signature: bool = True) -> dict[str, Any]:
        """JSON-ready dict; ``with_signature=False`` gives the signed content."""
        data: dict[str, Any] = {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "server_round": self.server_round,
            "created": self.created,
            "model": self.model,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "class_labels": list(self.class_labels) if self.class_labels is not None else None,
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
            "metrics": self.metrics,
            "privacy": self.privacy,
            "run_id": self.run_id,
        }
        if self.task is not None:  # absent from older artifacts, whose signatures must verify
            data["task"] = self.task
        if with_signature:
            data["signature"] = self.signature
        return data

    def signed_bytes(self) -> bytes:
        """Return the canonical bytes the signature covers."""
        return canonical_json(self.to_dict(with_signature=False))

    @classmethod
    def from_dict(cls, data: Any) -> ModelManifest:
        """Parse a manifest dict, raising :class:`ModelIntegrityError` on any malformed field."""
        _require(isinstance(data, dict), "manifest must be a JSON object")
        _require(
            data.get("format") == MANIFEST_FORMAT,
            f"unknown manifest format {data.get('format')!r} (expected {MANIFEST_FORMAT!r})",
        )
        unknown = set(data) - _FIELDS
        _require(not unknown, f"unknown manifest fields {sorted(unknown)}")
        for key, kind in _TYPES.items():
            _require(type(data.get(key)) is kind, f"manifest field {key!r} must be {kind.__name__}")
        inputs = tuple(TensorSpec.from_dict(t) for t in _list(data.get("inputs"), "inputs"))
        outputs = tuple(TensorSpec.from_dict(t) for t in _list(data.get("outputs"), "outputs"))
        _require(len(inputs) == 1 and len(outputs) == 1, "exactly one input and one output")
        labels = data.get("class_labels")
        _require(
            labels is None
            or (isinstance(labels, list) and all(isinstance(x, str) for x in labels)),
            "'class_labels' must be null or a list of strings",
        )
        task = data.get("task")
        _require(task is None or _valid_task(task), "'task' must be an object with a known 'kind'")
        sig = data.get("signature")
        _require(
            sig is None
            or (isinstance(sig, dict) and all(isinstance(v, str) for v in sig.values())),
            "'signature' must be null or an object of strings",
        )
        return cls(
            name=data["name"],
            version=data["version"],
            server_round=data["server_round"],
            created=data["created"],
            model=data["model"],
            inputs=inputs,
            outputs=outputs,
            weights_sha256=data["weights_sha256"],
            run_id=data["run_id"],
            metrics=data["metrics"],
            privacy=data["privacy"],
            class_labels=tuple(labels) if labels is not None else None,
            task=task,
            weights_file=data["weights_file"],
            format=data["format"],
            signature=sig,
        )

    @classmethod
    def from_json(cls, raw: bytes) -> ModelManifest:
        """Parse ``manifest.json`` bytes (strict JSON: NaN/Infinity rejected)."""
        return cls.from_dict(_loads(raw))


_TYPES: dict[str, type] = {
    "name": str,
    "version": int,
    "server_round": int,
    "created": str,
    "model": dict,
    "weights_file": str,
    "weights_sha256": str,
    "metrics": dict,
    "privacy": dict,
    "run_id": str,
}
_FIELDS = set(_TYPES) | {"format", "inputs", "outputs", "class_labels", "task", "signature"}


def _valid_task(task: Any) -> bool:
    from fedinfer.tasks import TASK_KINDS

    if not isinstance(task, dict) or task.get("kind") not in TASK_KINDS:
        return False
    threshold = task.get("threshold", 0.5)
    return type(threshold) in (int, float) and 0 < threshold < 1


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise ModelIntegrityError(f"malformed manifest: {reason}")


def _list(value: Any, key: str) -> list[Any]:
    _require(isinstance(value, list), f"{key!r} must be a list")
    return list(value)


def _reject_constant(name: str) -> Any:
    raise ModelIntegrityError(f"malformed manifest: non-standard JSON constant {name}")


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelIntegrityError(f"malformed manifest: not valid JSON ({exc})") from None


def canonical_json(data: Any) -> bytes:
    """Canonical UTF-8 JSON: sorted keys, no whitespace, NaN/Infinity forbidden."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def jsonable(value: Any, *, where: str = "value") -> Any:
    """Convert metrics-like data (numpy scalars, tuples, non-finite floats) to strict JSON.

    Examples
    --------
    >>> jsonable({"eps": float("inf"), "acc": np.float32(0.5), "n": np.int64(3)})
    {'eps': 'inf', 'acc': 0.5, 'n': 3}
    """
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: dict keys must be strings")
        return {k: jsonable(v, where=f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, where=where) for v in value]
    raise ConfigError(f"{where}: {type(value).__name__} cannot go into a manifest (use JSON types)")
