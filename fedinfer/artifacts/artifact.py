"""Write, verify and read one model artifact directory.

An artifact directory holds exactly two files::

    weights.safetensors   the parameters (safetensors: no code, no pickle)
    manifest.json         see :mod:`fedinfer.artifacts.manifest`, Ed25519-signed

Verification order matters: the signature is checked over the manifest first,
then the weights' SHA-256 against the signed hash, and only then are the
weights parsed. Nothing in an unverified artifact is ever deserialized beyond
strict JSON.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedinfer.artifacts.manifest import MANIFEST_FORMAT, ModelManifest, TensorSpec, jsonable
from fedinfer.artifacts.signing import key_fingerprint, sign_bytes, verify_bytes
from fedinfer.config.schema import ModelConfig
from fedinfer.errors import ConfigError, ModelIntegrityError
from fedinfer.fsutil import fsync_directory

__all__ = [
    "INPUT_NAME",
    "MANIFEST_FILE",
    "OUTPUT_NAME",
    "WEIGHTS_FILE",
    "check_weights_sha256",
    "read_manifest",
    "read_weights",
    "verify_artifact",
    "verify_artifact_bytes",
    "weights_from_bytes",
    "write_artifact",
]

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def write_artifact(
    out_dir: Path,
    *,
    weights: Mapping[str, np.ndarray],
    model_cfg: ModelConfig,
    input_dim: int,
    num_classes: int,
    version: int,
    server_round: int,
    metrics: Mapping[str, Any],
    privacy: Mapping[str, Any],
    run_id: str,
    signing_key: Ed25519PrivateKey,
    name: str | None = None,
    class_labels: list[str] | None = None,
    onnx_graph: bytes | None = None,
    task: Mapping[str, Any] | None = None,
) -> Path:
    """Write a signed model artifact into ``out_dir`` (created; must not exist or be empty).

    The weights are checked against ``model_cfg`` (a strict ``load_state_dict``)
    before anything is signed, and the directory appears atomically: a crash
    leaves either no ``out_dir`` or a complete one.

    Parameters
    ----------
    out_dir : Path
        Directory to create.
    weights : Mapping[str, np.ndarray]
        The model's ``state_dict`` as numpy arrays (see ``weights_from_module``).
    model_cfg : ModelConfig
        The config the weights were trained with.
    input_dim, num_classes : int
        Model input width and number of classes.
    version : int
        Artifact version (>= 1), strictly increasing per federation.
    server_round : int
        The round that produced these weights.
    metrics, privacy : Mapping[str, Any]
        Evaluation metrics and privacy spent (JSON-able; ``inf`` becomes ``"inf"``).
    run_id : str
        Identifier of the federation run.
    signing_key : Ed25519PrivateKey
        The coordinator's key.
    name : str or None
        Model name served at ``/v2/models/{name}`` (default: ``model_cfg.name``).
    class_labels : list[str] or None
        Optional human-readable class names (default: None).
    onnx_graph : bytes or None
        The model's checked ONNX export, stored (and signed) with the weights under
        ``ONNX_GRAPH_KEY`` so a site can serve it without importing the model's code.
    task : Mapping or None
        The learning task, at least ``{"kind": ...}`` (:mod:`fedinfer.tasks`); it sets what a
        site serves (probabilities, labels or values). None: not recorded (multiclass).

    Returns
    -------
    Path
        ``out_dir``.

    Examples
    --------
    >>> path = write_artifact(tmp / "v3", weights=weights_from_module(model),
    ...                       model_cfg=cfg.model, input_dim=40, num_classes=10, version=3,
    ...                       server_round=3, metrics={"accuracy": 0.91}, privacy={"epsilon": 2.1},
    ...                       run_id="run-1", signing_key=key)  # doctest: +SKIP
    """
    _check_write_args(version, server_round, input_dim, num_classes, class_labels, task)
    arrays = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    if onnx_graph is not None:
        from fedinfer.artifacts.torch_model import ONNX_GRAPH_KEY

        arrays[ONNX_GRAPH_KEY] = np.frombuffer(onnx_graph, dtype=np.uint8).copy()
    model_dict = jsonable(dataclasses.asdict(model_cfg), where="model_cfg")
    input_shape = _input_shape(model_cfg, input_dim)
    blob = st_save(arrays)
    manifest = ModelManifest(
        name=name or model_cfg.name,
        version=version,
        server_round=server_round,
        created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        model=model_dict,
        inputs=(TensorSpec(INPUT_NAME, (-1, *input_shape), "FP32"),),
        outputs=(TensorSpec(OUTPUT_NAME, (-1, num_classes), "FP32"),),
        weights_sha256=hashlib.sha256(blob).hexdigest(),
        run_id=run_id,
        metrics=jsonable(dict(metrics), where="metrics"),
        privacy=jsonable(dict(privacy), where="privacy"),
        class_labels=tuple(class_labels) if class_labels is not None else None,
        task=jsonable(dict(task), where="task") if task is not None else None,
        weights_file=WEIGHTS_FILE,
        format=MANIFEST_FORMAT,
    )
    model = _check_weights_fit(arrays, manifest)
    if model_cfg.name == "custom":  # a user's module: say how big it is
        from fedinfer.models import count_parameters

        manifest = dataclasses.replace(
            manifest, model={**model_dict, "num_parameters": count_parameters(model)}
        )
    signed = dataclasses.replace(manifest, signature=_signature(signing_key, manifest))
    return _write_atomically(Path(out_dir), blob, signed)


def _check_write_args(
    version: int,
    server_round: int,
    input_dim: int,
    num_classes: int,
    class_labels: list[str] | None,
    task: Mapping[str, Any] | None = None,
) -> None:
    if type(version) is not int or version < 1:
        raise ConfigError(f"artifact `version` must be an integer >= 1 (got {version!r})")
    if type(server_round) is not int or server_round < 0:
        raise ConfigError(f"artifact `server_round` must be an integer >= 0 (got {server_round!r})")
    kind = str(task.get("kind", "multiclass")) if task is not None else "multiclass"
    least = 2 if kind == "multiclass" else 1  # binary: one logit; regression: one value
    if input_dim <= 0 or num_classes < least:
        raise ConfigError(
            f"need input_dim > 0 and num_classes >= {least} for task {kind} "
            f"(got {input_dim}, {num_classes})"
        )
    if class_labels is not None and len(class_labels) != num_classes:
        raise ConfigError(
            f"`class_labels` has {len(class_labels)} entries but the model has "
            f"{num_classes} classes"
        )


def _input_shape(model_cfg: ModelConfig, input_dim: int) -> tuple[int, ...]:
    if model_cfg.input_shape is None:
        return (input_dim,)
    shape = tuple(int(d) for d in model_cfg.input_shape)
    if not shape or any(d < 1 for d in shape) or math.prod(shape) != input_dim:
        raise ConfigError(
            f"`model.input_shape` {list(shape)} does not fit input_dim {input_dim}; "
            f"its product must be {input_dim}"
        )
    return shape


def _check_weights_fit(arrays: Mapping[str, np.ndarray], manifest: ModelManifest) -> Any:
    from fedinfer.artifacts.torch_model import load_torch_model  # torch import is heavy

    try:
        return load_torch_model(arrays, manifest)
    except ModelIntegrityError as exc:
        raise ConfigError(f"refusing to sign weights that do not fit the model: {exc}") from None


def _signature(key: Ed25519PrivateKey, manifest: ModelManifest) -> dict[str, str]:
    sig = sign_bytes(key, manifest.signed_bytes())
    return {
        "algorithm": "ed25519",
        "key_id": key_fingerprint(key.public_key()),
        "value": base64.b64encode(sig).decode("ascii"),
    }


def _write_atomically(out_dir: Path, blob: bytes, manifest: ModelManifest) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"artifact directory {out_dir} exists and is not empty; choose a new one")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_synced(staging / WEIGHTS_FILE, blob)
        _write_synced(staging / MANIFEST_FILE, _pretty_json(manifest.to_dict()))
        os.chmod(staging, 0o755)
        os.replace(staging, out_dir)  # atomic; an empty out_dir is replaced
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(out_dir.parent)
    return out_dir


def _pretty_json(data: dict[str, Any]) -> bytes:
    import json

    return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def read_manifest(artifact_dir: Path) -> ModelManifest:
    """Parse ``manifest.json`` WITHOUT verifying it (for display; never for serving)."""
    return ModelManifest.from_json(_read_file(Path(artifact_dir) / MANIFEST_FILE))


def verify_artifact(artifact_dir: Path, *, public_key: Ed25519PublicKey) -> ModelManifest:
    """Verify the signature and the weights' SHA-256 of an artifact; return its manifest.

    Raises
    ------
    ModelIntegrityError
        Unsigned, signed by another key, manifest edited, weights edited or missing;
        the message says which.
    """
    manifest = read_manifest(artifact_dir)
    verify_manifest_signature(manifest, public_key=public_key)
    _read_verified_blob(Path(artifact_dir), manifest)
    return manifest


def verify_artifact_bytes(
    manifest_raw: bytes, weights_raw: bytes, *, public_key: Ed25519PublicKey
) -> ModelManifest:
    """:func:`verify_artifact` on an artifact held in memory (e.g. just decrypted)."""
    manifest = ModelManifest.from_json(manifest_raw)
    verify_manifest_signature(manifest, public_key=public_key)
    check_weights_sha256(weights_raw, manifest)
    return manifest


def verify_manifest_signature(manifest: ModelManifest, *, public_key: Ed25519PublicKey) -> None:
    """Raise :class:`ModelIntegrityError` unless ``manifest`` carries a valid signature."""
    sig = manifest.signature
    if sig is None:
        raise ModelIntegrityError(f"model {manifest.name!r} v{manifest.version} is unsigned")
    if sig.get("algorithm") != "ed25519":
        raise ModelIntegrityError(f"unsupported signature algorithm {sig.get('algorithm')!r}")
    try:
        value = base64.b64decode(sig.get("value", ""), validate=True)
    except (binascii.Error, ValueError):
        raise ModelIntegrityError("signature value is not valid base64") from None
    try:
        verify_bytes(public_key, value, manifest.signed_bytes())
    except ModelIntegrityError as exc:
        hint = ""
        if sig.get("key_id") != key_fingerprint(public_key):
            hint = f" (signed by key {sig.get('key_id')}, not the trusted key)"
        raise ModelIntegrityError(
            f"model {manifest.name!r} v{manifest.version}: {exc}{hint}"
        ) from None


def _read_verified_blob(artifact_dir: Path, manifest: ModelManifest) -> bytes:
    blob = _read_file(artifact_dir / WEIGHTS_FILE)
    check_weights_sha256(blob, manifest)
    return blob


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelIntegrityError(f"cannot read {path}: {exc.strerror}") from None


def check_weights_sha256(blob: bytes, manifest: ModelManifest) -> None:
    """Raise :class:`ModelIntegrityError` unless ``blob`` hashes to the signed SHA-256."""
    if manifest.weights_file != WEIGHTS_FILE:
        raise ModelIntegrityError(f"unexpected weights file name {manifest.weights_file!r}")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.weights_sha256:
        raise ModelIntegrityError(
            f"weights of model {manifest.name!r} v{manifest.version} do not match the signed "
            f"sha256 (expected {manifest.weights_sha256[:16]}..., got {digest[:16]}...)"
        )


def read_weights(artifact_dir: Path, manifest: ModelManifest) -> dict[str, np.ndarray]:
    """Read the weights after re-checking their SHA-256 against ``manifest``."""
    return weights_from_bytes(_read_file(Path(artifact_dir) / WEIGHTS_FILE), manifest)


def weights_from_bytes(blob: bytes, manifest: ModelManifest) -> dict[str, np.ndarray]:
    """Parse safetensors bytes (in memory) after re-checking their SHA-256 against ``manifest``."""
    check_weights_sha256(blob, manifest)
    try:
        return dict(st_load(blob))
    except (SafetensorError, ValueError) as exc:
        raise ModelIntegrityError(f"weights file is not valid safetensors: {exc}") from None
