"""Signed, versioned model artifacts and the site-local ModelStore.

An artifact is ``weights.safetensors`` + ``manifest.json`` signed with the
coordinator's Ed25519 key; loading never executes code. See
:mod:`fedinfer.artifacts.artifact` and :mod:`fedinfer.artifacts.store`.
"""

from typing import TYPE_CHECKING, Any

from fedinfer.artifacts.artifact import (
    INPUT_NAME,
    MANIFEST_FILE,
    OUTPUT_NAME,
    WEIGHTS_FILE,
    read_manifest,
    read_weights,
    verify_artifact,
    verify_manifest_signature,
    write_artifact,
)
from fedinfer.artifacts.manifest import ModelManifest, TensorSpec
from fedinfer.artifacts.signing import (
    generate_signing_key,
    key_fingerprint,
    load_public_key,
    load_signing_key,
    save_public_key,
    save_signing_key,
)
from fedinfer.artifacts.store import ModelStore

if TYPE_CHECKING:
    from fedinfer.artifacts.torch_model import (
        ONNX_GRAPH_KEY,
        load_torch_model,
        model_config_of,
        split_onnx_graph,
        weights_from_module,
    )

__all__ = [
    "INPUT_NAME",
    "MANIFEST_FILE",
    "ONNX_GRAPH_KEY",
    "OUTPUT_NAME",
    "WEIGHTS_FILE",
    "ModelManifest",
    "ModelStore",
    "TensorSpec",
    "generate_signing_key",
    "key_fingerprint",
    "load_public_key",
    "load_signing_key",
    "load_torch_model",
    "split_onnx_graph",
    "model_config_of",
    "read_manifest",
    "read_weights",
    "save_public_key",
    "save_signing_key",
    "verify_artifact",
    "verify_manifest_signature",
    "weights_from_module",
    "write_artifact",
]

# The torch half is imported on first use: a store can be listed, verified and rolled back
# without torch (`fedinfer models list` starts in a fraction of a second).
_TORCH_NAMES = (
    "ONNX_GRAPH_KEY",
    "load_torch_model",
    "model_config_of",
    "split_onnx_graph",
    "weights_from_module",
)
_LAZY = dict.fromkeys(_TORCH_NAMES, "fedinfer.artifacts.torch_model")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
