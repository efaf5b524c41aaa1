"""A user's own ``torch.nn.Module`` named by import path (``model=custom``), safely.

Contract (README "Bring your own model"):

* ``model._target_`` names a ``torch.nn.Module`` subclass (or a factory returning one).
  It is called with ``model.kwargs`` as keyword arguments, plus ``input_shape`` (a tuple)
  and ``num_classes`` when its signature names them. It must map a float32 batch of shape
  ``(batch, *input_shape)`` to logits ``(batch, num_classes)``.
* Data stays flat ``(n, prod(input_shape))``; :class:`ShapedModel` reshapes every batch, so
  the flat and the shaped form of a batch give the same logits.
* A site imports the target only when its own allow-list names it:
  ``$FEDINFER_MODEL_TARGETS``, comma-separated exact targets or ``package.prefix.*``
  entries. A coordinator or a manifest naming a module is a request, never a permission.
* Under DP-SGD the module is validated with Opacus ``ModuleValidator``; with
  ``privacy.fix_model=true`` incompatible layers are replaced (``ModuleValidator.fix``,
  BatchNorm -> GroupNorm) and the replacements are logged and reported.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedinfer.config.schema import FedInferConfig, ModelConfig, PrivacyConfig
from fedinfer.errors import ConfigError
from fedinfer.targets import MODEL_TARGETS

__all__ = [
    "ALLOW_ENV",
    "ShapedModel",
    "allow_target",
    "allowed_targets",
    "build_custom",
    "check_target_allowed",
    "dp_compatible",
    "export_graph",
    "input_shape_of",
    "preflight",
]

ALLOW_ENV = MODEL_TARGETS.env_var
logger = logging.getLogger(__name__)


def allowed_targets() -> tuple[str, ...]:
    """The site's allow-list of importable model targets, from ``$FEDINFER_MODEL_TARGETS``."""
    return MODEL_TARGETS.entries()


def allow_target(target: str) -> None:
    """Add ``target`` to this process's allow-list (and its children's).

    Only for a run whose own config is the site's config (a simulation on one machine);
    a deployed site sets ``$FEDINFER_MODEL_TARGETS`` itself.
    """
    MODEL_TARGETS.allow(target)


def check_target_allowed(target: str) -> None:
    """Raise :class:`ConfigError` unless the allow-list names ``target`` (:mod:`fedinfer.targets`)."""
    MODEL_TARGETS.check(target)


def input_shape_of(cfg: ModelConfig, input_dim: int) -> tuple[int, ...]:
    """The per-sample shape: ``model.input_shape`` checked against the data, else flat."""
    if cfg.input_shape is None:
        return (int(input_dim),)
    shape = tuple(int(d) for d in cfg.input_shape)
    if not shape or any(d < 1 for d in shape) or math.prod(shape) != input_dim:
        raise ConfigError(
            f"`model.input_shape` {list(shape)} does not fit the data's {input_dim} features "
            f"per sample; its product must be {input_dim}"
        )
    return shape


class ShapedModel(nn.Module):
    """Reshapes a flat (or already shaped) batch to ``(batch, *input_shape)`` for ``net``."""

    def __init__(self, net: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``net``'s logits for ``x`` reshaped to ``(batch, *input_shape)``."""
        out: torch.Tensor = self.net(x.reshape(x.shape[0], *self.input_shape))
        return out


def _reject_nested_targets(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "_target_":
                raise ConfigError(
                    f"`{where}` contains a nested `_target_`; model.kwargs must be plain values"
                )
            _reject_nested_targets(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _reject_nested_targets(item, f"{where}[{i}]")


def build_custom(cfg: ModelConfig, *, input_dim: int, num_classes: int) -> ShapedModel:
    """Import the allow-listed ``model._target_`` and instantiate it (see the module doc)."""
    target = cfg._target_
    if not target:
        raise ConfigError("`model._target_` is required for model=custom")
    MODEL_TARGETS.check(target)
    kwargs = dict(cfg.kwargs or {})
    _reject_nested_targets(kwargs, "model.kwargs")
    shape = input_shape_of(cfg, input_dim)
    factory = MODEL_TARGETS.load(target)
    from hydra.utils import instantiate

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "input_shape" in params:
        kwargs.setdefault("input_shape", shape)
    if "num_classes" in params:
        kwargs.setdefault("num_classes", int(num_classes))
    try:
        net = instantiate({"_target_": target, **kwargs}, _recursive_=False, _convert_="all")
    except Exception as exc:  # the user's constructor may raise anything
        cause = " ".join(str(exc.__cause__ or exc).split())
        raise ConfigError(
            f"`model._target_` {target!r} failed to build with model.kwargs {cfg.kwargs}: {cause}"
        ) from None
    if not isinstance(net, nn.Module):
        raise ConfigError(
            f"`model._target_` {target!r} returned {type(net).__name__}, not a torch.nn.Module"
        )
    return ShapedModel(net, shape)


def _incompatible_layers(model: nn.Module) -> list[str]:
    from opacus.validators import ModuleValidator

    bad = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None and ModuleValidator.validate(module):
            bad.append(f"{name or '<root>'} ({type(module).__name__})")
    if not bad and ModuleValidator.validate(model):
        bad.append(f"<root> ({type(model).__name__})")
    return bad


def dp_compatible(
    model: nn.Module, privacy: PrivacyConfig | None
) -> tuple[nn.Module, list[str]]:
    """Return ``model`` ready for DP-SGD, and the layer replacements made (if any).

    Without DP-SGD the model is returned unchanged. With it, an incompatible model is
    fixed when ``privacy.fix_model`` is true, else a :class:`ConfigError` names the layer.
    """
    if privacy is None or privacy.mode != "dpsgd":
        return model, []
    bad = _incompatible_layers(model)
    if not bad:
        return model, []
    if not privacy.fix_model:
        raise ConfigError(
            f"the model's layer {bad[0]} cannot be trained with DP-SGD"
            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; set privacy.fix_model=true "
            "to replace it (BatchNorm -> GroupNorm) or change the model"
        )
    from opacus.validators import ModuleValidator

    before = {name: type(m).__name__ for name, m in model.named_modules()}
    fixed = ModuleValidator.fix(model)
    after = {name: type(m).__name__ for name, m in fixed.named_modules()}
    replaced = [
        f"{name}: {kind} -> {after[name]}"
        for name, kind in before.items()
        if name in after and after[name] != kind and name
    ]
    remaining = _incompatible_layers(fixed)
    if remaining:
        raise ConfigError(
            f"privacy.fix_model=true could not make layer {remaining[0]} DP-compatible; "
            "change the model"
        )
    # Every party builds the model every round; preflight() reports the fix once per run.
    logger.debug("privacy.fix_model replaced %s", "; ".join(replaced))
    return fixed, replaced


def preflight(cfg: FedInferConfig, *, input_dim: int, num_classes: int) -> None:
    """Build the run's custom model once before any site starts; raise a one-line error.

    Catches, before Ray starts: a target off the allow-list, a bad constructor, a layer
    DP-SGD cannot train, and (with secure aggregation, which sums float vectors) a
    non-float buffer such as BatchNorm's ``num_batches_tracked``.
    """
    model, replaced = dp_compatible(
        build_custom(cfg.model, input_dim=input_dim, num_classes=num_classes), cfg.privacy
    )
    if replaced:
        logger.warning(
            "privacy.fix_model replaced %d layer(s) of %s for DP-SGD: %s",
            len(replaced),
            cfg.model._target_,
            "; ".join(replaced),
        )
    _check_output_shape(model, cfg, input_dim=input_dim, num_outputs=num_classes)
    _check_export(model, cfg, input_dim=input_dim)
    if cfg.secagg.enabled:
        for name, value in model.state_dict().items():
            if not value.is_floating_point():
                raise ConfigError(
                    f"secure aggregation sums float arrays, but the model's {name!r} is "
                    f"{str(value.dtype).removeprefix('torch.')} (a BatchNorm counter?); use "
                    "privacy=dpsgd privacy.fix_model=true, a model without it, or secagg=off"
                )


def _check_export(model: nn.Module, cfg: FedInferConfig, *, input_dim: int) -> None:
    """Export the untrained model once: a model that cannot be served as ONNX is refused now."""
    from fedinfer.errors import ServingError
    from fedinfer.serving.backends import export_onnx

    try:
        export_onnx(model.eval(), input_shape=(input_dim,))
    except ServingError as exc:
        _refuse_or_warn(cfg, exc)


def _refuse_or_warn(cfg: FedInferConfig, exc: Exception) -> None:
    reason = " ".join(str(exc).split())
    if not cfg.serving.allow_torch_fallback:
        raise ConfigError(
            f"`model._target_` {cfg.model._target_!r} cannot be served as ONNX ({reason}); make "
            "its forward exportable by torch.onnx, or set serving.allow_torch_fallback=true "
            "(sites then serve it with torch and need the target on $FEDINFER_MODEL_TARGETS)"
        )
    logger.warning("the model artifact carries no ONNX graph: %s", reason)


def _check_output_shape(
    model: nn.Module, cfg: FedInferConfig, *, input_dim: int, num_outputs: int
) -> None:
    """One forward pass of two zero samples: the output must be ``(2, num_outputs)``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, input_dim))
    except Exception as exc:  # the user's forward may raise anything
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(
            f"`model._target_` {cfg.model._target_!r} fails on a batch of shape "
            f"(2, *{list(input_shape_of(cfg.model, input_dim))}): {reason}; check model.input_shape"
        ) from None
    finally:
        model.train(was_training)
    kind = cfg.task.kind
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_outputs):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = {
            "binary": "1 logit (binary: P(class 1) = sigmoid)",
            "regression": f"{num_outputs} value(s), one per target",
            "multilabel": f"{num_outputs} logits, one per label",
        }.get(kind, f"{num_outputs} logits, one per class")
        raise ConfigError(
            f"`model._target_` {cfg.model._target_!r} outputs {got} for a batch of 2, but "
            f"task.kind={kind} needs (batch, {num_outputs}): {what}; change the model's output "
            "layer (its constructor gets num_classes = that width) or task.kind"
        )


def export_graph(
    cfg: FedInferConfig,
    weights: Mapping[str, Any],
    *,
    input_dim: int,
    num_classes: int,
) -> bytes | None:
    """The custom model's ONNX graph for its artifact (flat ``(batch, input_dim)`` input).

    Exported where the code already runs (the coordinator) and checked against eager torch,
    so sites can serve the signed graph without importing the code. None for built-in
    models. When export or the check fails: a ConfigError, unless
    ``serving.allow_torch_fallback`` (then None with a warning: sites need the target on
    their allow-list to serve it with torch).
    """
    if cfg.model.name != "custom":
        return None
    import numpy as np

    from fedinfer.errors import ServingError
    from fedinfer.models.registry import build_model
    from fedinfer.serving.backends import export_onnx

    model = build_model(
        cfg.model, input_dim=input_dim, num_classes=num_classes, privacy=cfg.privacy
    )
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v, copy=True)) for k, v in weights.items()}, strict=True
    )
    try:
        return export_onnx(model.eval(), input_shape=(input_dim,))
    except ServingError as exc:
        _refuse_or_warn(cfg, exc)
        return None
