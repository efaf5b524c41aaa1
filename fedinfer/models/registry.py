"""Build a model from its config by name.

Every model takes a float32 batch of shape ``(batch, input_dim)`` and returns
logits of shape ``(batch, num_classes)``, so the serving side can treat all of
them alike. A custom model (``model=custom``, :mod:`fedinfer.models.custom`) also
accepts ``(batch, *input_shape)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedinfer.config.schema import ModelConfig, PrivacyConfig
from fedinfer.errors import ConfigError

__all__ = ["MODEL_NAMES", "build_model", "count_parameters", "describe_model"]


class Cnn1d(nn.Module):
    """A small 1-D CNN for sequence-like tabular inputs such as MNIST-1D.

    Three strided convolutions with GroupNorm (per-sample statistics, so DP-SGD's
    per-sample gradients stay valid), then global average pooling and a linear head.
    """

    def __init__(self, *, input_dim: int, num_classes: int, channels: int, groups: int) -> None:
        super().__init__()
        if channels % groups != 0:
            raise ConfigError(
                f"`model.channels` ({channels}) must be divisible by `model.groups` ({groups}); "
                "pick e.g. model.channels=32 model.groups=8"
            )
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, kernel_size=5, padding=2),
            nn.GroupNorm(groups, channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.GroupNorm(groups, channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.GroupNorm(groups, channels),
            nn.ReLU(),
        )
        reduced = _conv_out(_conv_out(input_dim))
        self.head = nn.Linear(channels * reduced, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for a ``(batch, input_dim)`` float tensor."""
        h = self.features(x.unsqueeze(1))
        logits: torch.Tensor = self.head(h.flatten(1))
        return logits


def _conv_out(length: int) -> int:
    """Length after a kernel-3, stride-2, padding-1 convolution."""
    return (length - 1) // 2 + 1


def _mlp(cfg: ModelConfig, input_dim: int, num_classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    width = input_dim
    for hidden in cfg.hidden_sizes:
        if hidden <= 0:
            raise ConfigError(f"`model.hidden_sizes` entries must be > 0 (got {cfg.hidden_sizes})")
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn1d(cfg: ModelConfig, input_dim: int, num_classes: int) -> nn.Module:
    return Cnn1d(
        input_dim=input_dim, num_classes=num_classes, channels=cfg.channels, groups=cfg.groups
    )


def _logreg(cfg: ModelConfig, input_dim: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(input_dim, num_classes))


_BUILDERS: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {
    "cnn1d": _cnn1d,
    "logreg": _logreg,
    "mlp": _mlp,
}
MODEL_NAMES: tuple[str, ...] = tuple(sorted(_BUILDERS))
"""The built-in models (``custom`` is a user's module, see :mod:`fedinfer.models.custom`)."""


def build_model(
    cfg: ModelConfig,
    *,
    input_dim: int,
    num_classes: int,
    privacy: PrivacyConfig | None = None,
) -> nn.Module:
    """Build the model named by ``cfg.name``.

    Parameters
    ----------
    cfg : ModelConfig
        The ``model`` config group.
    input_dim : int
        Number of input features per sample.
    num_classes : int
        Output width: logits of the classes (one for a binary task), or regression targets
        (:func:`fedinfer.tasks.num_outputs`).
    privacy : PrivacyConfig or None
        The run's privacy config: under DP-SGD the model is checked (and, with
        ``privacy.fix_model``, fixed) for Opacus. Every party that builds the model of one
        run (coordinator, sites) passes the same config, so all build the same structure.

    Returns
    -------
    torch.nn.Module
        A freshly initialised model (seed torch beforehand for determinism).

    Examples
    --------
    >>> from fedinfer.config.schema import ModelConfig, PrivacyConfig
    >>> model = build_model(ModelConfig(name="mlp"), input_dim=40, num_classes=10)
    """
    if cfg.name == "custom":
        from fedinfer.models.custom import build_custom, dp_compatible

        model, _ = dp_compatible(
            build_custom(cfg, input_dim=input_dim, num_classes=num_classes), privacy
        )
        return model
    if cfg.input_shape is not None:
        raise ConfigError(
            "`model.input_shape` applies to model=custom only; the built-in models take flat "
            "vectors (drop model.input_shape or use model=custom)"
        )
    builder = _BUILDERS.get(cfg.name)
    if builder is None:
        raise ConfigError(
            f"`model.name` is {cfg.name!r}, which is not a known model; "
            f"choose one of {', '.join(MODEL_NAMES)} or custom (e.g. model=cnn1d)"
        )
    if input_dim <= 0 or num_classes < 1:
        raise ConfigError(
            f"a model needs input_dim > 0 and at least 1 output (got {input_dim}, {num_classes})"
        )
    return builder(cfg, input_dim, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_model(
    cfg: ModelConfig, *, input_dim: int, num_classes: int, privacy: PrivacyConfig | None = None
) -> dict[str, object]:
    """What results.json reports about the model: name, target, kwargs, shape, size, DP fixes."""
    replaced: list[str] = []
    if cfg.name == "custom":
        from fedinfer.models.custom import build_custom, dp_compatible

        model, replaced = dp_compatible(
            build_custom(cfg, input_dim=input_dim, num_classes=num_classes), privacy
        )
    else:
        model = build_model(cfg, input_dim=input_dim, num_classes=num_classes)
    return {
        "name": cfg.name,
        "target": cfg._target_,
        "kwargs": dict(cfg.kwargs or {}),
        "input_shape": list(cfg.input_shape) if cfg.input_shape else [input_dim],
        "num_parameters": count_parameters(model),
        "dp_fixes": replaced,
    }
