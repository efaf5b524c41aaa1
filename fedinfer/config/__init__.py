"""Typed configuration: schemas, Hydra ConfigStore registration, validation."""

from typing import TYPE_CHECKING, Any

from fedinfer.config.schema import (
    DatasetConfig,
    DeploymentConfig,
    FaultsConfig,
    FederationConfig,
    FedInferConfig,
    ModelConfig,
    PartitionConfig,
    PrivacyConfig,
    SecAggConfig,
    ServingConfig,
    SimulationConfig,
    StrategyConfig,
)

if TYPE_CHECKING:
    from fedinfer.config.store import conf_dir, load_config, register_configs
    from fedinfer.config.validate import validate_config

__all__ = [
    "DatasetConfig",
    "DeploymentConfig",
    "FaultsConfig",
    "FedInferConfig",
    "FederationConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "SecAggConfig",
    "ServingConfig",
    "SimulationConfig",
    "StrategyConfig",
    "conf_dir",
    "load_config",
    "register_configs",
    "validate_config",
]

# Hydra is imported on first use: the schemas alone are what most commands need.
_LAZY = {
    **dict.fromkeys(("conf_dir", "load_config", "register_configs"), "fedinfer.config.store"),
    "validate_config": "fedinfer.config.validate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
