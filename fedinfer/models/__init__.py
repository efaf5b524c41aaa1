"""Model registry: every model is Opacus-compatible (GroupNorm, never BatchNorm)."""

from fedinfer.models.registry import MODEL_NAMES, build_model, count_parameters

__all__ = ["MODEL_NAMES", "build_model", "count_parameters"]
