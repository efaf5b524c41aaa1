"""The ServerApp and ClientApp of a deployment (``server/app.py`` and ``clients/app.py``).

Both take the federation's typed config from Flower's run config (written by
:func:`fedinfer.fl.run_config.to_run_config` into the app bundle the
coordinator builds). For a site that config is only a request: the ClientApp
checks it against the site's own policy file (named in the node config) and
refuses what the policy forbids.

The ServerApp runs in a process the SuperLink spawns; what only the coordinator
may know (its output directory, the signing key's path, whether to resume) is
not in the run config, which every site sees, but in ``serverapp.json`` in the
directory named by ``$FEDINFER_COORDINATOR_DIR``, which the SuperLink's
processes inherit from ``fedinfer coordinator``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedinfer.artifacts import load_signing_key
from fedinfer.config.schema import FedInferConfig
from fedinfer.errors import ConfigError, FedInferError
from fedinfer.fl.client_app import build_client_app, node_policy
from fedinfer.fl.coordinator import ModelShape, run_coordinator
from fedinfer.fl.grid import PollingGrid
from fedinfer.fl.run_config import from_run_config
from fedinfer.fl.site import SiteEnv, deployment_resolver
from fedinfer.privacy.noise import refuse_reproducible_noise
from fedinfer.reporting.progress import RoundPrinter

__all__ = [
    "COORDINATOR_DIR_ENV",
    "CoordinatorRuntime",
    "build_deploy_client_app",
    "build_deploy_server_app",
    "config_of",
    "model_shape",
]

logger = logging.getLogger(__name__)

COORDINATOR_DIR_ENV = "FEDINFER_COORDINATOR_DIR"
RUNTIME_FILE = "serverapp.json"


@dataclass(frozen=True)
class CoordinatorRuntime:
    """Coordinator-only settings of one ``fedinfer coordinator`` start (``serverapp.json``)."""

    output_dir: str
    signing_key: str
    run_id: str
    resume: bool
    rounds_log: str
    coordinator_pid: int

    def save(self, directory: Path) -> Path:
        """Write ``serverapp.json`` into ``directory``."""
        path = Path(directory) / RUNTIME_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def from_env(cls) -> CoordinatorRuntime:
        """Read the settings the coordinator left for this ServerApp process."""
        directory = os.environ.get(COORDINATOR_DIR_ENV)
        if not directory:
            raise ConfigError(
                f"${COORDINATOR_DIR_ENV} is not set: this ServerApp runs only under a SuperLink "
                "started by `fedinfer coordinator`"
            )
        data: dict[str, Any] = json.loads((Path(directory) / RUNTIME_FILE).read_text())
        return cls(**data)


def config_of(context: Context) -> FedInferConfig:
    """Return the federation's typed config from a message's or the ServerApp's context."""
    if "dataset.name" not in context.run_config:
        raise ConfigError(
            "the run config carries no fedinfer config; start the federation with "
            "`fedinfer coordinator` "
            "(it writes the config into the Flower app it runs)"
        )
    return from_run_config(dict(context.run_config))


def model_shape(cfg: FedInferConfig) -> ModelShape:
    """Return the model's input and output size, which a coordinator without data must be told."""
    dep = cfg.deployment
    missing = [f"deployment.{k}" for k in ("input_dim", "num_classes") if getattr(dep, k) is None]
    if missing:
        raise ConfigError(
            f"{', '.join(f'`{k}`' for k in missing)} must be set for a deployment: the coordinator "
            "holds no data to learn the model's shape from (e.g. deployment.input_dim=40 "
            "deployment.num_classes=10 for mnist1d)"
        )
    assert dep.input_dim is not None and dep.num_classes is not None
    least = 2 if cfg.task.kind in ("multiclass", "binary") else 1  # labels / targets: >= 1
    if dep.input_dim < 1 or dep.num_classes < least:
        raise ConfigError(
            f"`deployment.input_dim` must be >= 1 and `deployment.num_classes` >= {least} for "
            f"task.kind={cfg.task.kind} (multilabel: labels; regression: targets)"
        )
    return ModelShape(input_dim=dep.input_dim, num_classes=dep.num_classes, task=cfg.task.kind)


def wait_for_sites(grid: Grid, cfg: FedInferConfig, *, poll_s: float = 1.0) -> int:
    """Wait for ``federation.num_sites`` connected sites; after the timeout accept ``min_sites``.

    Raises
    ------
    FedInferError
        Fewer than ``federation.min_sites`` sites connected within ``deployment.connect_timeout_s``.
    """
    wanted, enough = (
        cfg.federation.num_sites,
        min(cfg.federation.min_sites, cfg.federation.num_sites),
    )
    deadline = time.monotonic() + cfg.deployment.connect_timeout_s
    connected = len(list(grid.get_node_ids()))
    while connected < wanted and time.monotonic() < deadline:
        time.sleep(poll_s)
        connected = len(list(grid.get_node_ids()))
    if connected < enough:
        raise FedInferError(
            f"only {connected} site(s) connected within `deployment.connect_timeout_s`="
            f"{cfg.deployment.connect_timeout_s:.0f}s; `federation.min_sites`={enough}"
        )
    logger.info("%d of %d sites connected", connected, wanted)
    return connected


def exit_with_coordinator(pid: int, *, poll_s: float = 1.0) -> threading.Thread:
    """Leave when the ``fedinfer coordinator`` process ``pid`` is gone.

    Flower's ServerApp process outlives a SuperLink that died under it (its exit
    handlers keep retrying the SuperLink), so a killed coordinator would leave it
    behind. Nothing is lost by leaving: checkpoints are written whole or not at all.
    """

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                logger.error("coordinator process %d is gone; the ServerApp exits", pid)
                os._exit(70)
            except PermissionError:
                continue

    thread = threading.Thread(target=watch, name="coordinator-watchdog", daemon=True)
    thread.start()
    return thread


def build_deploy_server_app() -> ServerApp:
    """Build the coordinator's ServerApp: wait for sites, run or resume the federation, publish."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        runtime = CoordinatorRuntime.from_env()
        exit_with_coordinator(runtime.coordinator_pid)
        cfg = config_of(context)
        refuse_reproducible_noise(
            cfg.privacy.reproducible_noise, where="the deployment's coordinator (ServerApp)"
        )
        output_dir = Path(runtime.output_dir)
        cfg.output_dir = str(output_dir)
        shape = model_shape(cfg)
        grid = PollingGrid(grid)  # Flower's Grid waits 3 s between pulls of replies
        wait_for_sites(grid, cfg)
        with open(runtime.rounds_log, "a") as rounds:
            printer = RoundPrinter(
                num_rounds=cfg.federation.rounds,
                task=cfg.task.kind,
                console=Console(file=rounds, highlight=False, soft_wrap=True, width=120),
            )
            result = run_coordinator(
                grid,
                cfg=cfg,
                shape=shape,
                output_dir=output_dir,
                run_id=runtime.run_id,
                signing_key=load_signing_key(Path(runtime.signing_key)),
                printer=printer,
                resume=runtime.resume,
            )
            version, deployed = result.results.get("model_version"), result.deployed
            printer.message(
                f"published version {version} to {', '.join(sorted(deployed))}"
                if version is not None
                else "published no model: no round was aggregated"
            )
        if result.state.stop_reason and not result.deployed:
            raise FedInferError(f"federation stopped: {result.state.stop_reason}")

    return app


def build_deploy_client_app(*, cache_site: bool = False) -> ClientApp:
    """Build a site's ClientApp: config from the run config, identity and data from node config.

    The site worker (:mod:`fedinfer.deploy.site_worker`) runs it with ``cache_site=True``: the
    site's data is loaded once and reused while its file and the data config stay the same.
    """
    cache: dict[object, SiteEnv] | None = {} if cache_site else None
    return build_client_app(
        config_fn=config_of,
        resolver_fn=lambda cfg: deployment_resolver(
            cfg, num_classes=model_shape(cfg).num_classes, cache=cache
        ),
        policy_fn=node_policy,
    )
