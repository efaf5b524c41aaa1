"""Turn verified weights + manifest into a torch module, and back."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedinfer.artifacts.manifest import ModelManifest
from fedinfer.config.schema import ModelConfig, PrivacyConfig
from fedinfer.errors import ConfigError, ModelIntegrityError
from fedinfer.models import build_model

__all__ = [
    "ONNX_GRAPH_KEY",
    "load_torch_model",
    "model_config_of",
    "split_onnx_graph",
    "weights_from_module",
]

ONNX_GRAPH_KEY = "__onnx_graph__"
"""A uint8 tensor in an artifact's weights holding the model's ONNX graph (custom models): signed
with the weights, and served by ONNX Runtime without importing the model's Python code."""


def split_onnx_graph(
    weights: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], bytes | None]:
    """The weights without the embedded ONNX graph, and the graph's bytes (None if absent)."""
    rest = {k: v for k, v in weights.items() if k != ONNX_GRAPH_KEY}
    graph = weights.get(ONNX_GRAPH_KEY)
    return rest, (np.asarray(graph, dtype=np.uint8).tobytes() if graph is not None else None)

_DERIVED_KEYS = ("num_parameters",)
"""Keys of a manifest's ``model`` dict that describe the model rather than configure it."""


def model_config_of(manifest: ModelManifest) -> ModelConfig:
    """Return the :class:`ModelConfig` recorded in ``manifest``."""
    fields = {k: v for k, v in manifest.model.items() if k not in _DERIVED_KEYS}
    try:
        return ModelConfig(**fields)
    except TypeError as exc:
        raise ModelIntegrityError(f"manifest 'model' is not a ModelConfig: {exc}") from None


def load_torch_model(weights: Mapping[str, np.ndarray], manifest: ModelManifest) -> nn.Module:
    """Build the manifest's model, load ``weights`` strictly, and return it in eval mode.

    Examples
    --------
    >>> weights, manifest = ModelStore(root).load()  # doctest: +SKIP
    >>> model = load_torch_model(weights, manifest)  # doctest: +SKIP
    """
    cfg = model_config_of(manifest)
    weights, _ = split_onnx_graph(weights)
    try:
        model = build_model(cfg, input_dim=manifest.input_dim, num_classes=manifest.num_classes)
    except ConfigError as exc:
        raise ModelIntegrityError(f"manifest describes an invalid model: {exc}") from None
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in weights.items()}
    try:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError:
            if cfg.name != "custom":
                raise
            # Trained under DP with privacy.fix_model: the same module, Opacus-fixed.
            from fedinfer.models.custom import dp_compatible

            model, _ = dp_compatible(model, PrivacyConfig(mode="dpsgd", fix_model=True))
            model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelIntegrityError(
            f"weights do not fit model {manifest.model.get('name')!r}: {' '.join(first[:3])}"
        ) from None
    return model.eval()


def weights_from_module(model: nn.Module) -> dict[str, np.ndarray]:
    """Return the ``state_dict`` as numpy arrays (CPU copies), ready for ``write_artifact``."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
