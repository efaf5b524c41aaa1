"""Hydra ConfigStore registration and programmatic composition."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from fedinfer.config.schema import FedInferConfig
from fedinfer.errors import ConfigError

__all__ = ["MOVED_KEYS", "check_moved_keys", "conf_dir", "load_config", "register_configs"]

MOVED_KEYS = {
    "secagg.site_min_threshold_fraction": "site_policy.secagg_min_threshold",
    "secagg.site_min_participants": "site_policy.secagg_min_participants",
}
"""Keys that left the coordinator's config: a site's own floors are its policy's."""


def check_moved_keys(overrides: Sequence[str]) -> None:
    """Raise ConfigError naming the new key for an override of a key in :data:`MOVED_KEYS`."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in MOVED_KEYS:
            raise ConfigError(
                f"`{key}` is no longer part of the run config (the coordinator's request): a "
                f"site's floor is its own policy's `{MOVED_KEYS[key]}` (in a simulation "
                f"`{MOVED_KEYS[key]}=...`; a deployed site: its policy file)"
            )


def register_configs() -> None:
    """Register the root schema as ``base_config`` (``conf/config.yaml`` extends it)."""
    ConfigStore.instance().store(name="base_config", node=FedInferConfig)


def conf_dir() -> Path:
    """The Hydra config directory: ``$FEDINFER_CONF_DIR`` or the repository's ``conf/``."""
    env = os.environ.get("FEDINFER_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "config.yaml").exists():
        raise ConfigError(
            f"no Hydra config found at {path}; run from a fedinfer checkout installed with "
            "`pip install -e .`, or set FEDINFER_CONF_DIR to a directory holding config.yaml"
        )
    return path


def load_config(overrides: Sequence[str] = (), *, config_name: str = "config") -> FedInferConfig:
    """Compose the config as ``fedinfer simulate`` would, without running anything.

    Examples
    --------
    >>> cfg = load_config(["federation.num_sites=4", "privacy=none"])
    >>> cfg.federation.num_sites
    4
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_moved_keys(overrides)
    from fedinfer.config.overrides import check_overrides

    register_configs()
    conf = conf_dir()
    check_overrides(overrides, conf=conf)  # one line with "did you mean", before Hydra's
    try:
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            composed = compose(config_name=config_name, overrides=list(overrides))
            result = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as exc:
        first = next((x.strip() for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
        raise ConfigError(
            f"cannot compose the config with overrides {list(overrides)}: {first}"
        ) from exc
    assert isinstance(result, FedInferConfig)
    return result
