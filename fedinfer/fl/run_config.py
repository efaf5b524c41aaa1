"""The one place that translates our typed config to Flower's flat run/node config and back.

Flower's ``run_config`` is a flat mapping of dotted, kebab-case keys to scalars
(``federation.local-epochs = 2``). ``None`` values are omitted and lists are
JSON-encoded strings, since Flower config values are scalars.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from fedinfer.config.schema import FedInferConfig

__all__ = [
    "SITE_ONLY_GROUPS",
    "NodeConfigKeys",
    "from_run_config",
    "run_id_of",
    "to_app_config",
    "to_run_config",
]


SITE_ONLY_GROUPS = frozenset({"site_policy"})
"""Config groups that belong to the sites: never in the run config the coordinator sends."""


class NodeConfigKeys:
    """Keys a SuperNode's ``node_config`` may carry (deployment) or the simulation sets."""

    PARTITION_ID = "partition-id"  # set by Flower's simulation runtime
    NUM_PARTITIONS = "num-partitions"
    SITE_NAME = "site-name"
    DATA_PATH = "data-path"
    STATE_DIR = "state-dir"
    COORDINATOR_PUBLIC_KEY = "coordinator-public-key"
    STATE_KEY_FILE = "state-key-file"  # the site's at-rest key (a path; never the key)
    POLICY_FILE = "policy-file"  # the site's policy (fedinfer.policy), set by `fedinfer site`


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(name: str) -> str:
    return name.replace("-", "_")


def to_run_config(cfg: FedInferConfig) -> dict[str, bool | int | float | str]:
    """Flatten ``cfg`` to Flower's run-config form.

    Examples
    --------
    >>> from fedinfer.config.schema import FedInferConfig
    >>> flat = to_run_config(FedInferConfig())
    >>> flat["federation.num-sites"]
    10
    """
    flat: dict[str, bool | int | float | str] = {}
    for group in dataclasses.fields(cfg):
        if group.name in SITE_ONLY_GROUPS:
            continue
        value = getattr(cfg, group.name)
        if dataclasses.is_dataclass(value):
            for leaf in dataclasses.fields(value):
                _put(flat, f"{group.name}.{_kebab(leaf.name)}", getattr(value, leaf.name))
        else:
            _put(flat, _kebab(group.name), value)
    return flat


def to_app_config(cfg: FedInferConfig) -> dict[str, Any]:
    """``cfg`` as the nested ``[tool.flwr.app.config]`` table of a Flower app's pyproject.toml.

    Flower flattens the TOML tables back with dots, so the run config a ServerApp
    or ClientApp receives is exactly :func:`to_run_config` of ``cfg``.

    Examples
    --------
    >>> from fedinfer.config.schema import FedInferConfig
    >>> to_app_config(FedInferConfig())["federation"]["num-sites"]
    10
    """
    nested: dict[str, Any] = {}
    for key, value in to_run_config(cfg).items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _put(flat: dict[str, bool | int | float | str], key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, list | tuple | dict):
        flat[key] = json.dumps(list(value) if not isinstance(value, dict) else value)
    else:
        flat[key] = value


def from_run_config(run_config: dict[str, Any]) -> FedInferConfig:
    """Rebuild the typed config from a run config written by :func:`to_run_config`.

    Unknown keys are ignored (Flower adds its own); values are checked against the
    schema by OmegaConf, so a wrong type names its key.
    """
    schema = OmegaConf.structured(FedInferConfig)
    groups = {f.name: f for f in dataclasses.fields(FedInferConfig)}
    nested: dict[str, Any] = {}
    for key, value in run_config.items():
        parts = [_snake(p) for p in key.split(".")]
        if parts[0] in SITE_ONLY_GROUPS:
            continue  # a coordinator cannot set a site's policy
        if len(parts) == 2 and parts[0] in groups and parts[1] in schema[parts[0]].keys():
            node = schema[parts[0]]._get_node(parts[1])
            is_json = OmegaConf.is_list(node) or OmegaConf.is_dict(node)  # lists, model.kwargs
            nested.setdefault(parts[0], {})[parts[1]] = (
                json.loads(value) if is_json and isinstance(value, str) else value
            )
        elif len(parts) == 1 and parts[0] in groups:
            nested[parts[0]] = value
    merged = OmegaConf.merge(schema, nested)
    result = OmegaConf.to_object(merged)
    assert isinstance(result, FedInferConfig)
    return result


def run_id_of(config: Mapping[str, Any], context: Any) -> str:
    """The one run id of a federation, as the site records it (issue 14 item 6).

    The coordinator's run id travels in every train message (``Keys.RUN_ID``); it is the
    id ``results.json``, the model manifest and every site's privacy ledger record. Flower's
    own ``context.run_id`` is only the fallback for a message without one.
    """
    from fedinfer.fl.messages import Keys

    value = config.get(Keys.RUN_ID)
    return str(value) if value not in (None, "") else str(context.run_id)
