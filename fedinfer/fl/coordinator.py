"""The coordinator's job from first round to published model, independent of the runtime.

The same function runs inside Flower's simulation runtime, the in-process test
grid and a deployed SuperLink's ServerApp: it only talks to sites through a Grid.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedinfer.artifacts import MANIFEST_FILE, WEIGHTS_FILE, write_artifact
from fedinfer.config.schema import FedInferConfig
from fedinfer.data.federated import SiteDataset
from fedinfer.fl.checkpoint import load_checkpoint, save_checkpoint
from fedinfer.fl.loop import EvaluateFn, FederationState, RoundRecord, run_rounds, site_of
from fedinfer.fl.messages import Keys, MessageTypes
from fedinfer.fl.records import arrays_to_weights, weights_to_arrays
from fedinfer.fl.strategy import build_strategy
from fedinfer.models import build_model, describe_model
from fedinfer.models.custom import export_graph
from fedinfer.reporting import tracking
from fedinfer.reporting.progress import RoundPrinter
from fedinfer.privacy.noise import provides_dp
from fedinfer.reporting.results import (
    ResultsWriter,
    plot_accuracy,
    plot_metrics,
    write_json_atomic,
)
from fedinfer.tasks import num_outputs, task_spec
from fedinfer.training import evaluate, get_weights, select_device, set_weights

__all__ = ["CoordinatorResult", "ModelShape", "run_coordinator"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What the coordinator must know to build the model without seeing any data."""

    input_dim: int
    num_classes: int
    """Size of the label space: classes, labels (multilabel) or targets (regression)."""
    task: str = "multiclass"
    """``task.kind`` (:mod:`fedinfer.tasks`)."""

    @property
    def num_outputs(self) -> int:
        """The model's output width (one logit for binary)."""
        return num_outputs(self.task, self.num_classes)


@dataclass(frozen=True)
class CoordinatorResult:
    """The outcome of a federation."""

    state: FederationState
    results: dict[str, object]
    model_dir: Path | None
    deployed: dict[str, int]


def initial_arrays(cfg: FedInferConfig, shape: ModelShape) -> ArrayRecord:
    """The seeded initial global model."""
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.model, input_dim=shape.input_dim, num_classes=shape.num_outputs, privacy=cfg.privacy
    )
    return weights_to_arrays(get_weights(model))


def central_evaluate_fn(cfg: FedInferConfig, shape: ModelShape, test: SiteDataset) -> EvaluateFn:
    """Evaluate the global model on a held-out split at the coordinator (simulation only)."""
    device = select_device(cfg.simulation.device)
    model = build_model(
        cfg.model, input_dim=shape.input_dim, num_classes=shape.num_outputs, privacy=cfg.privacy
    ).to(device)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        set_weights(model, arrays_to_weights(arrays))
        result = evaluate(
            model, test, device=device, task=cfg.task.kind, threshold=cfg.task.threshold
        )
        return {**result.metrics, "loss": result.loss}

    return evaluate_fn


def wrap_secure_aggregation(strategy: Strategy, cfg: FedInferConfig, grid: Grid) -> Strategy:
    """Wrap ``strategy`` with secure aggregation when ``secagg.enabled``."""
    if not cfg.secagg.enabled:
        return strategy
    from fedinfer.fl.secagg_server import SecAggStrategy

    return SecAggStrategy(strategy, cfg=cfg, grid=grid)


def run_coordinator(
    grid: Grid,
    *,
    cfg: FedInferConfig,
    shape: ModelShape,
    output_dir: Path,
    run_id: str,
    signing_key: Ed25519PrivateKey,
    central_test: SiteDataset | None = None,
    printer: RoundPrinter | None = None,
    resume: bool = False,
) -> CoordinatorResult:
    """Run the configured rounds, then sign the final model and publish it to every site.

    With ``resume``, continue from ``output_dir``'s checkpoint (same run id, model, strategy
    and sampling state; see :mod:`fedinfer.fl.checkpoint`); without one, start afresh.
    """
    random.seed(cfg.seed)  # Flower samples sites with the `random` module
    np.random.seed(cfg.seed % 2**32)
    num_sites = len(list(grid.get_node_ids())) or cfg.federation.num_sites
    strategy = wrap_secure_aggregation(build_strategy(cfg, num_sites=num_sites), cfg, grid)
    state = FederationState(arrays=initial_arrays(cfg, shape))
    if (
        resume
        and (checkpoint := load_checkpoint(output_dir, cfg=cfg, strategy=strategy)) is not None
    ):
        state, run_id = checkpoint.state, checkpoint.run_id
    writer = ResultsWriter(output_dir, cfg=cfg, run_id=run_id)
    writer.data["dp"] = provides_dp(cfg.privacy)  # false: no DP, or replayable noise (not DP)
    writer.data["model"] = describe_model(
        cfg.model, input_dim=shape.input_dim, num_classes=shape.num_outputs, privacy=cfg.privacy
    )
    writer.data["task"] = _task_summary(cfg, shape)
    writer.data["rounds"] = [r.to_json() for r in state.history]
    printer = printer or RoundPrinter(
        num_rounds=cfg.federation.rounds, enabled=cfg.simulation.progress, task=cfg.task.kind
    )
    started = time.perf_counter()
    tracking.start_run(cfg, run_id=run_id)

    def on_round_end(record: RoundRecord, state: FederationState) -> None:
        writer.add_round(record.to_json(), elapsed_s=time.perf_counter() - started)
        save_checkpoint(output_dir, cfg=cfg, state=state, strategy=strategy, run_id=run_id)
        tracking.track_round(cfg, record.to_json(), step=record.round)
        before = state.history[-2] if len(state.history) > 1 else None
        late = before if before is not None and before.federated_via == "train" else None
        printer.line(record, previous=late)

    def on_federated(record: RoundRecord, state: FederationState) -> None:
        # A finished round's federated metrics, a round late (fedinfer.fl.loop): results.json
        # and MLflow now; the next round's checkpoint and progress line carry them.
        writer.update_round(record.to_json())
        tracking.track_round(cfg, {"federated": record.federated}, step=record.round)

    state = run_rounds(
        grid=grid,
        strategy=strategy,
        state=state,
        num_rounds=cfg.federation.rounds,
        min_sites=min(cfg.federation.min_sites, num_sites),
        timeout=cfg.federation.round_timeout_s,
        train_config=ConfigRecord({Keys.RUN_ID: run_id}),
        evaluate_fn=central_evaluate_fn(cfg, shape, central_test)
        if central_test is not None
        else None,
        on_round_end=on_round_end,
        on_federated=on_federated,
    )
    if state.stop_reason:
        printer.message(f"[yellow]Federation ended early:[/] {state.stop_reason}")
    model_dir, deployed, version = None, {}, None
    if state.completed_round > 0 and any(r.aggregated for r in state.history):
        version = next_model_version(output_dir / "coordinator")
        model_dir = _write_final_artifact(
            cfg,
            shape,
            state,
            output_dir,
            run_id,
            signing_key,
            version,
            central=_central_dp_report(cfg, strategy, num_sites),
        )
        deployed = publish_to_sites(grid, model_dir, state, timeout=cfg.federation.round_timeout_s)
    central = _central_dp_report(cfg, strategy, num_sites)
    if central is not None:
        writer.data["central_dp"] = central
    writer.finish(
        status="stopped" if state.stop_reason else "completed",
        stop_reason=state.stop_reason,
        model_version=version,
        deployed=deployed,
    )
    plot_accuracy(writer.data, output_dir / "accuracy.png")
    plot_metrics(writer.data, output_dir / "metrics.png")
    tracking.finish_run(
        cfg, status=writer.data["status"], output_dir=output_dir, results=writer.data
    )
    return CoordinatorResult(
        state=state, results=writer.data, model_dir=model_dir, deployed=deployed
    )


def _write_final_artifact(
    cfg: FedInferConfig,
    shape: ModelShape,
    state: FederationState,
    output_dir: Path,
    run_id: str,
    signing_key: Ed25519PrivateKey,
    version: int,
    *,
    central: dict[str, object] | None = None,
) -> Path:
    last = state.history[-1]
    metrics = {
        **last.metrics,
        "accuracy": last.accuracy,
        "loss": last.loss,
        **{f"federated-{k}": v for k, v in last.federated.items()},
    }
    epsilons = [e for r in state.history for e in r.epsilon.values()]
    privacy = {
        "mode": cfg.privacy.mode,
        "max_epsilon_spent": max(epsilons, default=None),
        "delta_per_site": {s: p.get("delta") for r in state.history for s, p in r.privacy.items()},
        "secure_aggregation": cfg.secagg.enabled,
        "dp": provides_dp(cfg.privacy),
        **({"central_dp": central} if central is not None else {}),
    }
    target = output_dir / "model"
    if target.exists():
        import shutil

        shutil.rmtree(target)
    weights = arrays_to_weights(state.arrays)
    return write_artifact(
        target,
        weights=weights,
        model_cfg=cfg.model,
        input_dim=shape.input_dim,
        num_classes=shape.num_outputs,
        task=_task_summary(cfg, shape),
        version=version,
        server_round=state.completed_round,
        metrics={k: v for k, v in metrics.items() if v is not None},
        privacy=privacy,
        run_id=run_id,
        signing_key=signing_key,
        onnx_graph=export_graph(
            cfg, weights, input_dim=shape.input_dim, num_classes=shape.num_outputs
        ),
    )


def _task_summary(cfg: FedInferConfig, shape: ModelShape) -> dict[str, object]:
    """The task as results.json and the manifest record it (read back by serving)."""
    spec = task_spec(cfg.task.kind)
    summary: dict[str, object] = {
        "kind": spec.kind,
        "num_classes": shape.num_classes,
        "num_outputs": shape.num_outputs,
        "loss": spec.loss_name,
        "metrics": list(spec.metrics),
    }
    if spec.kind in ("binary", "multilabel"):
        summary["threshold"] = cfg.task.threshold
    return summary


def _central_dp_report(
    cfg: FedInferConfig, strategy: Strategy, num_sites: int
) -> dict[str, object] | None:
    """Site-level (epsilon, delta) of ``privacy=central`` so far (trusted coordinator)."""
    from fedinfer.privacy.accountant import default_delta
    from fedinfer.privacy.central import SecureCentralDp, central_epsilon

    if cfg.privacy.mode != "central" or not isinstance(strategy, SecureCentralDp):
        return None
    delta = cfg.privacy.delta if cfg.privacy.delta is not None else default_delta(num_sites)
    epsilon = central_epsilon(
        noise_multiplier=strategy.noise_multiplier, releases=strategy.releases, delta=delta
    )
    return {
        "unit": "site",
        "epsilon": epsilon if epsilon != float("inf") else None,
        "delta": delta,
        "noise_multiplier": strategy.noise_multiplier,
        "clipping_norm": strategy.clipping_norm,
        "releases": strategy.releases,
        "accountant": "rdp, no sampling amplification (upper bound)",
        "trusted_coordinator": True,
    }


def next_model_version(coordinator_dir: Path) -> int:
    """The next model version this coordinator publishes: strictly increasing across its runs.

    Sites refuse a version they already hold with other content, and any downgrade,
    so the counter lives in the coordinator's directory, not in the run.
    """
    path = coordinator_dir / "model_versions.json"
    last = int(json.loads(path.read_text())["last_version"]) if path.exists() else 0
    write_json_atomic(path, {"last_version": last + 1})
    return last + 1


def publish_to_sites(
    grid: Grid, model_dir: Path, state: FederationState, *, timeout: float
) -> dict[str, int]:
    """Send the signed artifact to every site (``query.deploy``); returns site -> stored version."""
    content = RecordDict(
        {
            Keys.ARTIFACT: ConfigRecord(
                {
                    Keys.MANIFEST: (model_dir / MANIFEST_FILE).read_bytes(),
                    Keys.WEIGHTS: (model_dir / WEIGHTS_FILE).read_bytes(),
                }
            )
        }
    )
    messages = [Message(content, node_id, MessageTypes.DEPLOY) for node_id in grid.get_node_ids()]
    deployed: dict[str, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        site = site_of(reply, state.site_names)
        if reply.has_error():
            logger.warning("site %s did not accept the model: %s", site, reply.error.reason)
            continue
        version = next(iter(reply.content.metric_records.values()))["version"]
        deployed[site] = int(cast(int, version))
    return deployed
