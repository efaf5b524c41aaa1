"""Model registry: the built-in models are Opacus-compatible (GroupNorm, never BatchNorm);
``model=custom`` builds a user's allow-listed module (:mod:`fedinfer.models.custom`)."""

from fedinfer.models.registry import MODEL_NAMES, build_model, count_parameters, describe_model

__all__ = ["MODEL_NAMES", "build_model", "count_parameters", "describe_model"]
