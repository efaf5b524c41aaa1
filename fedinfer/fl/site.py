"""What a site does with a message, independent of Flower: resolve itself, train, evaluate.

A site learns who it is and where its data and state live from a
:class:`SiteResolver`: in a simulation from Flower's partition id, in a
deployment from its SuperNode's node config. Nothing else differs, so the same
ClientApp runs in both.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Context

from fedinfer.config.schema import FedInferConfig
from fedinfer.crypto.at_rest import KEY_ENV_VAR, StateKey, resolve_state_key
from fedinfer.data import SiteData, build_federated_data, load_site_data, site_name
from fedinfer.data.shared import open_site
from fedinfer.errors import ConfigError
from fedinfer.fl.run_config import NodeConfigKeys
from fedinfer.models import build_model
from fedinfer.targets import DATA_TARGETS, MODEL_TARGETS
from fedinfer.tasks import num_outputs
from fedinfer.training import (
    evaluate,
    get_weights,
    make_loader,
    proximal_step_fn,
    select_device,
    set_weights,
    train_epochs,
)

if TYPE_CHECKING:
    from fedinfer.privacy.noise import DpRandomness

__all__ = [
    "SiteEnv",
    "SiteResolver",
    "TrainOutcome",
    "deployment_resolver",
    "local_evaluate",
    "local_train",
    "simulation_resolver",
    "site_environment",
]


@dataclass(frozen=True)
class SiteEnv:
    """Everything a site knows about itself."""

    site_id: str
    state_dir: Path
    data: SiteData
    coordinator_public_key: Path | None
    state_key: StateKey | None = None
    """Seals the site's state at rest (model store, ledger); None: plaintext."""
    simulated: bool = False
    """A site of a simulation; a deployed site (the default) refuses simulation-only switches
    such as ``privacy.reproducible_noise``."""


SiteResolver = Callable[[Context], SiteEnv]
SITE_ENVIRONMENT = (MODEL_TARGETS.env_var, DATA_TARGETS.env_var, KEY_ENV_VAR)
"""Environment variables a simulated site reads: the driver's values reach every actor."""


def site_environment() -> dict[str, str]:
    """This process's values of :data:`SITE_ENVIRONMENT` (call it in the driver)."""
    return {k: os.environ[k] for k in SITE_ENVIRONMENT if os.environ.get(k)}


def simulation_resolver(
    cfg: FedInferConfig,
    *,
    output_dir: Path,
    coordinator_public_key: Path | None,
    data_dir: Path | None = None,
    environment: Mapping[str, str] | None = None,
) -> SiteResolver:
    """Sites of a simulation: partition ``i`` is ``site-0i`` with state in ``sites/<id>/``.

    Their state is plaintext unless ``$FEDINFER_STATE_KEY_FILE`` names a state key, which
    then encrypts every simulated site's state (one key for all: they share a machine).
    With ``data_dir`` (written by :func:`fedinfer.data.shared.write_shared_sites`) a site maps
    its rows from those files instead of rebuilding the whole federation in each actor.

    ``environment`` (:func:`site_environment`, captured in the driver) is set in whichever
    process resolves a site: an actor on a Ray cluster started before the run never saw the
    driver's environment, and would otherwise refuse the run's own model or data function, or
    keep its state in plaintext.
    """

    def resolve(context: Context) -> SiteEnv:
        os.environ.update(environment or {})
        index = int(context.node_config[NodeConfigKeys.PARTITION_ID])
        if data_dir is not None:
            data = open_site(data_dir, index)
        else:
            data = build_federated_data(cfg).sites[index]
        state_dir = output_dir / "sites" / data.site_id
        return SiteEnv(
            site_id=data.site_id,
            state_dir=state_dir,
            data=data,
            coordinator_public_key=coordinator_public_key,
            state_key=resolve_state_key(None, protects=[state_dir]),
            simulated=True,
        )

    return resolve


def deployment_resolver(
    cfg: FedInferConfig, *, num_classes: int, cache: dict[object, SiteEnv] | None = None
) -> SiteResolver:
    """Sites of a deployment: identity, data file and state directory from the node config.

    With ``cache`` (a dict the caller keeps: the long-lived site worker) the site's data is
    loaded once and reused while the node config, the data file (size and mtime) and the
    config keys that shape the data stay the same.
    """

    def resolve(context: Context) -> SiteEnv:
        node = context.node_config
        missing = [k for k in (NodeConfigKeys.DATA_PATH, NodeConfigKeys.STATE_DIR) if k not in node]
        if missing:
            raise ConfigError(
                f"the SuperNode's --node-config lacks {missing}; start sites with `fedinfer site`"
            )
        if cache is None:
            return _load_deployed_site(cfg, node, num_classes=num_classes)
        spec = str(node[NodeConfigKeys.DATA_PATH])  # a file, a directory, or py:target
        stamp = (0, 0, 0) if spec.startswith("py:") else _data_stamp(Path(spec))
        key = (
            tuple(sorted((k, str(v)) for k, v in node.items())),
            stamp,
            (cfg.dataset.label_column, repr(cfg.partition), cfg.seed, num_classes, cfg.task.kind),
        )
        if key not in cache:
            cache.clear()
            cache[key] = _load_deployed_site(cfg, node, num_classes=num_classes)
        return cache[key]

    return resolve


def _load_deployed_site(
    cfg: FedInferConfig, node: Mapping[str, object], *, num_classes: int
) -> SiteEnv:
    name = str(node.get(NodeConfigKeys.SITE_NAME, site_name(0)))
    data = load_site_data(
        str(node[NodeConfigKeys.DATA_PATH]),  # a file, a directory, or py:target
        site_id=name,
        label_column=cfg.dataset.label_column,
        partition=cfg.partition,
        seed=cfg.seed,
        num_classes=num_classes,
        task=cfg.task.kind,
    )
    key = node.get(NodeConfigKeys.COORDINATOR_PUBLIC_KEY)
    state_dir = Path(str(node[NodeConfigKeys.STATE_DIR]))
    state_key_file = node.get(NodeConfigKeys.STATE_KEY_FILE)
    state_key = resolve_state_key(
        Path(str(state_key_file)) if state_key_file else None, protects=[state_dir]
    )
    return SiteEnv(name, state_dir, data, Path(str(key)) if key else None, state_key)


def _data_stamp(path: Path) -> tuple[int, int, int]:
    """(entries, bytes, newest mtime) of a data file, or of a directory tree, in one walk.

    A file added, removed, rewritten or touched anywhere under a data directory (a class
    folder of an image dataset included) changes the stamp, so the worker reloads the data.
    """
    stat = path.stat()
    if not path.is_dir():
        return 1, stat.st_size, stat.st_mtime_ns
    entries, size, newest = 0, 0, stat.st_mtime_ns
    pending = [str(path)]
    while pending:
        with os.scandir(pending.pop()) as scan:
            for entry in scan:
                info = entry.stat(follow_symlinks=True)
                entries, newest = entries + 1, max(newest, info.st_mtime_ns)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    size += info.st_size
    return entries, size, newest


@dataclass(frozen=True)
class TrainOutcome:
    """A site's trained weights and the metrics it reports (never raw data)."""

    weights: dict[str, np.ndarray]
    metrics: dict[str, float]


def round_seed(seed: int, site_id: str, server_round: int) -> int:
    """A per-site, per-round seed, stable across processes (predictable: never for DP noise)."""
    digest = hashlib.sha256(f"{seed}/{site_id}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def local_train(
    *,
    cfg: FedInferConfig,
    env: SiteEnv,
    global_weights: dict[str, np.ndarray],
    server_round: int,
    run_id: str,
) -> TrainOutcome:
    """Train the global model on the site's training split; DP-SGD when configured.

    Raises
    ------
    PrivacyBudgetExceeded
        Before touching the data, if this round would exceed ``privacy.max_epsilon``.
    """
    started = time.perf_counter()
    # Small models gain nothing from intra-op threads, and spinning OpenMP threads of several
    # sites on shared cores slow every site down by an order of magnitude.
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    randomness: DpRandomness | None = None
    if cfg.privacy.mode == "dpsgd":
        from fedinfer.privacy.noise import dp_randomness, refuse_reproducible_noise

        if not env.simulated:
            refuse_reproducible_noise(cfg.privacy.reproducible_noise, where="a deployed site")
        # Fresh OS entropy for the noise, the Poisson masks and torch's global RNG: nothing a
        # coordinator that knows the config could replay (fedinfer.privacy.noise).
        randomness = dp_randomness(
            seed=cfg.seed,
            site_id=env.site_id,
            server_round=server_round,
            reproducible=cfg.privacy.reproducible_noise,
        )
        torch.manual_seed(randomness.global_seed)
        loader_seed = randomness.sampler_seed
    else:
        torch.manual_seed(round_seed(cfg.seed, env.site_id, server_round))
        loader_seed = round_seed(cfg.seed, env.site_id, server_round)
    device = select_device(cfg.simulation.device)
    fed = cfg.federation
    model = build_model(
        cfg.model,
        input_dim=env.data.input_dim,
        num_classes=num_outputs(cfg.task.kind, env.data.num_classes),
        privacy=cfg.privacy,
    )
    set_weights(model, global_weights)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=fed.lr, momentum=fed.momentum)
    loader = make_loader(
        env.data.train,
        batch_size=fed.batch_size,
        shuffle=True,
        seed=loader_seed,
        num_workers=cfg.dataset.num_workers,
    )
    after_step = None
    if cfg.strategy.name == "fedprox" and cfg.strategy.proximal_mu > 0:
        anchors = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        after_step = proximal_step_fn(model, anchors, mu=cfg.strategy.proximal_mu, lr=fed.lr)
    privacy_metrics: dict[str, float] = {}
    if randomness is not None:
        from fedinfer.fl.site_privacy import private_train

        result, privacy_metrics = private_train(
            cfg=cfg,
            env=env,
            model=model,
            optimizer=optimizer,
            loader=loader,
            device=device,
            after_step=after_step,
            server_round=server_round,
            run_id=run_id,
            noise_generator=randomness.noise_generator(device),
        )
    else:
        result = train_epochs(
            model,
            loader,
            optimizer,
            epochs=fed.local_epochs,
            device=device,
            after_step=after_step,
            task=cfg.task.kind,
            threshold=cfg.task.threshold,
        )
    metrics = {
        "num-examples": float(len(env.data.train)),
        "train-loss": result.loss,
        **({"train-accuracy": result.accuracy} if result.accuracy is not None else {}),
        "steps": float(result.steps),
        "train-time-s": time.perf_counter() - started,
        **privacy_metrics,
    }
    return TrainOutcome(weights=get_weights(model.to("cpu")), metrics=metrics)


def local_evaluate(
    *, cfg: FedInferConfig, env: SiteEnv, global_weights: dict[str, np.ndarray]
) -> dict[str, float]:
    """Evaluate the global model on the site's local test split."""
    device = select_device(cfg.simulation.device)
    model = build_model(
        cfg.model,
        input_dim=env.data.input_dim,
        num_classes=num_outputs(cfg.task.kind, env.data.num_classes),
        privacy=cfg.privacy,
    )
    set_weights(model, global_weights)
    result = evaluate(
        model.to(device),
        env.data.test,
        device=device,
        task=cfg.task.kind,
        threshold=cfg.task.threshold,
    )
    # The sites' eval-* metrics are averaged by sample count: exact for accuracy and MAE, an
    # approximation for F1 and RMSE. AUC is a ranking over all samples, undefined on a split with
    # one class, and an average that misses a key is silently biased: it is not sent.
    return {
        "num-examples": float(result.num_examples),
        "eval-loss": result.loss,
        **{f"eval-{name}": value for name, value in result.metrics.items() if name != "auc"},
    }
