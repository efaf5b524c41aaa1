"""Run a federation in Flower's simulation runtime (Ray), or in-process for tests."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedinfer.artifacts import (
    ModelStore,
    generate_signing_key,
    key_fingerprint,
    load_signing_key,
    save_public_key,
    save_signing_key,
)
from fedinfer.artifacts.store import SIGNING_KEY_FILE
from fedinfer.config.schema import FedInferConfig
from fedinfer.config.validate import validate_config
from fedinfer.data import build_federated_data
from fedinfer.data.function import allow_data_target
from fedinfer.data.shared import write_shared_sites
from fedinfer.errors import ConfigError, ModelIntegrityError, StateKeyError
from fedinfer.fl.client_app import build_client_app
from fedinfer.fl.coordinator import CoordinatorResult, ModelShape, run_coordinator
from fedinfer.fl.grid import InProcessGrid
from fedinfer.fl.site import simulation_resolver, site_environment
from fedinfer.models.custom import allow_target, preflight
from fedinfer.reporting.progress import RoundPrinter
from fedinfer.simulation.ray_backend import backend_config

__all__ = ["SimulationResult", "run_simulation"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationResult:
    """A finished simulation: where it wrote, what it reached."""

    output_dir: Path
    results: dict[str, Any]
    coordinator: CoordinatorResult

    @property
    def final_accuracy(self) -> float | None:
        """Global test accuracy after the last round."""
        value = self.results.get("final_accuracy")
        return float(value) if value is not None else None

    @property
    def final_metrics(self) -> dict[str, float]:
        """Every held-out metric of the task after the last round (e.g. rmse, mae, r2)."""
        return dict(self.results.get("final_metrics") or {})


def _coordinator_keys(output_dir: Path) -> tuple[Any, Path]:
    """The run's Ed25519 model-signing key: the one ``output_dir`` already holds, else a fresh one.

    Every site's ModelStore pins the coordinator key at its first publish and refuses any
    other, so a re-used output directory keeps its key (private key 0600). Stores pinned
    to a key this directory no longer holds are refused here, before any round runs.
    """
    key_dir = output_dir / "coordinator"
    key_path = key_dir / "signing.key"
    key = load_signing_key(key_path) if key_path.is_file() else None
    _check_site_pins(output_dir, key, key_path)
    if key is None:
        key_dir.mkdir(parents=True, exist_ok=True)
        key = generate_signing_key()
        save_signing_key(key, key_path)
    public = save_public_key(key, key_dir / "signing.pub")
    return key, public


def _check_site_pins(output_dir: Path, key: Any, key_path: Path) -> None:
    """Raise ConfigError unless every site store in ``output_dir`` can accept ``key``'s models."""
    pins = _pinned_sites(output_dir)
    fix = "restore that key file, or run in a new output directory (hydra.run.dir=...)"
    if key is None and pins:
        raise ConfigError(
            f"output directory {output_dir} holds site model stores pinned to a coordinator "
            f"key, but not the key itself ({key_path}); {fix}"
        )
    mine = key_fingerprint(key.public_key()) if key is not None else None
    foreign = sorted(site for site, pinned in pins.items() if pinned not in (None, mine))
    if foreign:
        raise ConfigError(
            f"{key_path} (key {mine}) is not the key the model stores of {', '.join(foreign)} "
            f"pinned; {fix}"
        )


def _pinned_sites(output_dir: Path) -> dict[str, str | None]:
    """Site id -> key fingerprint its model store pinned (None: sealed at rest, checked later)."""
    pins: dict[str, str | None] = {}
    for pin in sorted(output_dir.glob(f"sites/*/models/{SIGNING_KEY_FILE}")):
        try:
            pinned = ModelStore(pin.parent).pinned_key()
        except (ModelIntegrityError, StateKeyError):  # the store itself refuses at publish
            pinned = None
        pins[pin.parent.parent.name] = key_fingerprint(pinned) if pinned is not None else None
    return pins


def run_simulation(
    cfg: FedInferConfig, *, output_dir: Path, printer: RoundPrinter | None = None
) -> SimulationResult:
    """Validate ``cfg``, build every site's data, run the federation, publish the final model.

    Every user mistake is raised as a :class:`~fedinfer.errors.FedInferError`
    before Ray starts.

    Examples
    --------
    >>> from fedinfer.config import load_config
    >>> cfg = load_config(["federation.rounds=2", "simulation.runtime=inprocess"])
    >>> result = run_simulation(cfg, output_dir=Path("outputs/demo"))  # doctest: +SKIP
    """
    validate_config(cfg)
    _check_secagg_floor(cfg)
    if cfg.model.name == "custom" and cfg.model._target_:
        # A simulation's own config is every simulated site's config, so its model target
        # is allowed here (a deployed site names its own allow-list, fedinfer.models.custom).
        allow_target(cfg.model._target_)
    if cfg.dataset.name == "function" and cfg.dataset._target_:
        allow_data_target(cfg.dataset._target_)  # likewise the data function of its sites
    data = build_federated_data(cfg)  # fails fast on bad data, and warms the cache for the sites
    if cfg.model.name == "custom" and cfg.model.input_shape is None:
        cfg.model.input_shape = list(data.sample_shape)  # e.g. digits: [1, 8, 8]
    shape = ModelShape(data.input_dim, data.num_classes, cfg.task.kind)
    if cfg.model.name == "custom":
        preflight(cfg, input_dim=data.input_dim, num_classes=shape.num_outputs)
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg.output_dir = str(output_dir)
    if cfg.secagg.enabled and cfg.site_policy.secagg_trusted_peers is None:
        from fedinfer.fl.secagg_site import simulation_peers

        site_ids = [site.site_id for site in data.sites]  # each trusts exactly these keys
        cfg.site_policy.secagg_trusted_peers = str(simulation_peers(output_dir, site_ids))
    signing_key, public_key = _coordinator_keys(output_dir)
    data_dir = None
    # Data read lazily from disk stays there: every actor indexes it (file names and labels).
    if cfg.simulation.runtime == "ray" and cfg.simulation.shared_data and not data.lazy:
        data_dir = write_shared_sites(data, output_dir / "site_data")  # mapped by every actor
    environment = site_environment()  # the driver's allow-lists and state key, for every actor
    client_app = build_client_app(
        config_fn=lambda context: cfg,
        resolver_fn=lambda c: simulation_resolver(
            c,
            output_dir=output_dir,
            coordinator_public_key=public_key,
            data_dir=data_dir,
            environment=environment,
        ),
    )
    run_id = uuid.uuid4().hex[:12]
    outcome: dict[str, Any] = {}

    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["result"] = run_coordinator(
                grid,
                cfg=cfg,
                shape=shape,
                output_dir=output_dir,
                run_id=run_id,
                signing_key=signing_key,
                central_test=data.pooled_test,
                printer=printer,
            )
        except BaseException as exc:  # re-raised in the caller's thread below
            outcome["error"] = exc

    with _quiet_flower(not cfg.simulation.flower_logs):
        if cfg.simulation.runtime == "inprocess":
            grid = InProcessGrid(
                client_app, num_nodes=cfg.federation.num_sites, run_id=1, seed=cfg.seed
            )
            main(
                grid,
                Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            )
        else:
            _run_on_ray(cfg, client_app, main)
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise RuntimeError("the simulation ended without a result; see the Flower log above")
    result: CoordinatorResult = outcome["result"]
    return SimulationResult(output_dir=output_dir, results=result.results, coordinator=result)


def _check_secagg_floor(cfg: FedInferConfig) -> None:
    """Refuse a federation whose every site would refuse every secure-aggregation round."""
    from fedinfer.errors import ConfigError
    from fedinfer.fl.strategy import sampled_per_round

    floor, num_sites = cfg.site_policy.secagg_min_participants, cfg.federation.num_sites
    if not cfg.secagg.enabled or sampled_per_round(cfg, num_sites) >= floor:
        return
    why = (
        f"every simulated site would refuse every secure-aggregation round under "
        f"`site_policy.secagg_min_participants`={floor} (with two, a site can subtract its own "
        "update from the sum)"
    )
    if num_sites < floor:
        raise ConfigError(
            f"`federation.num_sites`={num_sites} is below {floor}: {why}; set "
            f"federation.num_sites>={floor}, site_policy.secagg_min_participants={num_sites} "
            "or secagg=off"
        )
    raise ConfigError(
        f"`federation.fraction_train`={cfg.federation.fraction_train} samples "
        f"{sampled_per_round(cfg, num_sites)} of {num_sites} sites a round: {why}; raise "
        f"federation.fraction_train or federation.min_sites to reach {floor}, or secagg=off"
    )


@contextlib.contextmanager
def _quiet_flower(quiet: bool) -> Iterator[None]:
    """Keep Flower's per-message INFO logs off the terminal while our progress table shows."""
    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    if quiet:
        flwr_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        flwr_logger.setLevel(previous)


def _run_on_ray(cfg: FedInferConfig, client_app: ClientApp, main: Any) -> None:
    from flwr.simulation import run_simulation as flwr_run_simulation

    server_app = ServerApp()
    server_app.main()(main)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray

    # Inside a Ray task (Hydra's Ray launcher) Ray is already up and Flower joins it: leave it up.
    owns_ray = not ray.is_initialized()
    try:
        flwr_run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.federation.num_sites,
            backend_config=backend_config(cfg),
        )
    finally:
        if owns_ray and ray.is_initialized():  # stop Ray's daemons with the run, not at exit
            ray.shutdown()
