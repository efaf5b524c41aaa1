from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from fedinfer.config import ModelConfig
from fedinfer.errors import ConfigError
from fedinfer.models import MODEL_NAMES, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_output_logits_and_are_opacus_compatible(name: str) -> None:
    model = build_model(ModelConfig(name=name), input_dim=40, num_classes=10)
    assert model(torch.randn(5, 40)).shape == (5, 10)
    assert ModuleValidator.validate(model, strict=False) == []


def test_unknown_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.name"):
        build_model(ModelConfig(name="resnet"), input_dim=40, num_classes=10)


def test_cnn_channels_must_fit_groups() -> None:
    with pytest.raises(ConfigError, match="model.groups"):
        build_model(ModelConfig(name="cnn1d", channels=30, groups=8), input_dim=40, num_classes=10)
