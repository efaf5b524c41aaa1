"""Which Ray the simulation runs on, and with what share of it (Flower's ``backend_config``).

Flower 1.42's ``run_simulation`` hands ``backend_config["init_args"]`` to ``ray.init`` and
``backend_config["client_resources"]`` to every ClientApp actor. Two rules live here:

- ``simulation.ray_address=null`` passes ``address="local"``: the run always starts its own
  private Ray instance. Without it ``ray.init()`` joins whatever cluster
  ``/tmp/ray/ray_current_cluster`` names, and a file left by a stopped ``ray start`` made the run
  retry that dead head for ever ("Failed to connect to GCS").
- Any other address joins that cluster, after checking that a head answers there, so a wrong or
  dead address fails in seconds with an error that names the key.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from fedinfer.config.schema import FedInferConfig
from fedinfer.config.validate import check_ray_address
from fedinfer.errors import ConfigError

__all__ = ["backend_config", "resolve_ray_address"]

_CONNECT_TIMEOUT_S = 5.0


def backend_config(cfg: FedInferConfig) -> dict[str, Any]:
    """Flower's ``backend_config`` for ``cfg``: Ray's init arguments and each site's resources.

    ``federation.client_cpus`` and ``federation.client_gpus`` (fractions allowed) become every
    ClientApp actor's ``num_cpus`` / ``num_gpus``; ``simulation.num_cpus`` caps a private
    instance (a cluster's size is the cluster's, so it is not passed when joining one).

    Examples
    --------
    >>> backend_config(load_config(["simulation.ray_address=auto"]))  # doctest: +SKIP
    {'client_resources': {'num_cpus': 1.0, 'num_gpus': 0.0}, 'init_args': {'address': ...}}
    """
    init_args: dict[str, Any] = {
        "logging_level": "ERROR",
        "log_to_driver": False,
        "include_dashboard": False,
    }
    address = cfg.simulation.ray_address
    if address is None:
        init_args["address"] = "local"
        if cfg.simulation.num_cpus is not None:  # a parallel sweep's share of the machine
            init_args["num_cpus"] = cfg.simulation.num_cpus
    else:
        init_args["address"] = resolve_ray_address(address)
    return {
        "client_resources": {
            "num_cpus": cfg.federation.client_cpus,
            "num_gpus": cfg.federation.client_gpus,
        },
        "init_args": init_args,
    }


def resolve_ray_address(address: str) -> str:
    """The address to give ``ray.init``, once a Ray head is known to answer there.

    ``auto`` is looked up the way Ray does (``$RAY_ADDRESS``, then the cluster file of
    ``ray start``); a head that does not accept a TCP connection raises :class:`ConfigError`.
    """
    problem = check_ray_address(address)
    if problem:
        raise ConfigError(problem)
    target = address
    if address == "auto":
        target = _auto_address()
    host, _, port = target.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(
            f"`simulation.ray_address`={address!r}: no Ray head answers at {host}:{port} ({exc}); "
            "start one with `ray start --head`, fix the address, or set "
            "simulation.ray_address=null to run on a private local Ray"
        ) from None
    return address if address != "auto" else target


def _auto_address() -> str:
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    # Where `ray start` records its head: Ray's default temp dir, found as Ray finds it.
    system_tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    cluster_file = Path(system_tmp) / "ray" / "ray_current_cluster"
    try:
        found = cluster_file.read_text().strip()
    except FileNotFoundError:
        found = ""
    if not found:
        raise ConfigError(
            "`simulation.ray_address`=auto found no running Ray cluster on this machine "
            f"(no {cluster_file}); start one with `ray start --head`, give its host:port, or "
            "set simulation.ray_address=null to run on a private local Ray"
        )
    return found
