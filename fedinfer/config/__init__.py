"""Typed configuration: schemas, Hydra ConfigStore registration, validation."""

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
