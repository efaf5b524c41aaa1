"""Optional MLflow tracking: a run's config, every round's metrics, and its artifacts.

MLflow is an optional extra (``pip install 'fedinfer[tracking]'``). With
``tracking.mlflow=false`` (the default) every function here returns at once and
MLflow is never imported. The coordinator calls :func:`start_run` before the
first round, :func:`track_round` after each, and :func:`finish_run` at the end;
one run is tracked per process at a time (a sweep job is one process or one
sequential job).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedinfer.config.schema import FedInferConfig
from fedinfer.errors import ConfigError

__all__ = ["finish_run", "flatten_config", "round_metrics", "start_run", "track_round"]

_MAX_BATCH = 100  # MLflow's limit of params / metrics in one log_batch call
_MAX_PARAM_CHARS = 6000
_TERMINAL_STATUS = {"completed": "FINISHED", "stopped": "FINISHED", "failed": "FAILED"}
_ARTIFACTS = ("results.json", "accuracy.png", "metrics.png", "model/manifest.json")

_active: dict[str, Any] = {}  # "client", "run_id" of the run being tracked


def _mlflow() -> Any:
    try:
        import mlflow
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "`tracking.mlflow` is true but MLflow is not installed; install it with "
            "`pip install 'fedinfer[tracking]'`, or set tracking.mlflow=false"
        ) from exc
    return mlflow


def flatten_config(cfg: FedInferConfig) -> dict[str, str]:
    """The config as MLflow params: ``{"privacy.noise_multiplier": "1.0", ...}``."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", asdict(cfg))
    return flat


def round_metrics(record: dict[str, Any]) -> dict[str, float]:
    """One round of ``results.json`` as flat MLflow metrics (missing values left out).

    Examples
    --------
    >>> round_metrics({"round": 3, "accuracy": 0.9, "loss": None, "epsilon": {"site-00": 1.5}})
    {'accuracy': 0.9, 'epsilon/site-00': 1.5, 'max_epsilon': 1.5}
    """
    metrics: dict[str, Any] = {"accuracy": record.get("accuracy"), "loss": record.get("loss")}
    metrics.update({k: v for k, v in (record.get("metrics") or {}).items() if k != "accuracy"})
    for group in ("federated", "train", "epsilon"):
        for key, value in (record.get(group) or {}).items():
            metrics[f"{group}/{key}"] = value
    epsilons = list((record.get("epsilon") or {}).values())
    metrics["max_epsilon"] = max(epsilons) if epsilons else None
    if "sites" in record:
        metrics["sites/trained"] = len(record["sites"])
        metrics["sites/refused"] = len(record.get("refused") or {})
        metrics["sites/failed"] = len(record.get("failed") or {})
    metrics["duration_s"] = record.get("duration_s")
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)
    }


def start_run(cfg: FedInferConfig, *, run_id: str) -> str | None:
    """Open an MLflow run for this federation and log its config; returns MLflow's run id.

    Does nothing (returns None) unless ``cfg.tracking.mlflow``.
    """
    if not cfg.tracking.mlflow:
        return None
    mlflow = _mlflow()
    from mlflow.entities import Param

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.create_run(
        _experiment_id(client, cfg.tracking.experiment),
        run_name=cfg.tracking.run_name or run_id,
        tags={"fedinfer.run_id": run_id},
    )
    mlflow_run_id = str(run.info.run_id)
    params = [Param(k, v[:_MAX_PARAM_CHARS]) for k, v in flatten_config(cfg).items()]
    for start in range(0, len(params), _MAX_BATCH):
        client.log_batch(mlflow_run_id, params=params[start : start + _MAX_BATCH])
    client.log_dict(mlflow_run_id, asdict(cfg), "config.json")
    _active.update(client=client, run_id=mlflow_run_id)
    return mlflow_run_id


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:  # a parallel sweep job created it first
        return str(client.get_experiment_by_name(name).experiment_id)


def track_round(cfg: FedInferConfig, record_json: dict[str, Any], step: int) -> None:
    """Log one round's metrics (see :func:`round_metrics`) at ``step``; no-op when not tracking."""
    if not cfg.tracking.mlflow or not _active:
        return
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    metrics = [Metric(k, v, now_ms, step) for k, v in round_metrics(record_json).items()]
    for start in range(0, len(metrics), _MAX_BATCH):
        _active["client"].log_batch(_active["run_id"], metrics=metrics[start : start + _MAX_BATCH])


def finish_run(
    cfg: FedInferConfig,
    *,
    status: str,
    output_dir: Path | None = None,
    results: dict[str, Any] | None = None,
) -> None:
    """Log the run's summary and artifacts from ``output_dir``, then close the MLflow run.

    ``status`` is the run's ``results.json`` status (``completed``, ``stopped``,
    ``failed``). Safe to call when no run is open (does nothing).
    """
    if not cfg.tracking.mlflow or not _active:
        return
    client, run_id = _active.pop("client"), _active.pop("run_id")
    client.set_tag(run_id, "fedinfer.status", status)
    summary = dict(results or {})
    summary.update({f"final_{k}": v for k, v in (summary.get("final_metrics") or {}).items()})
    keys = ("final_accuracy", "best_accuracy", "max_epsilon", "elapsed_s")
    for key in (*keys, *(k for k in summary if k.startswith("final_") and k not in keys)):
        value = summary.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            client.log_metric(run_id, key, float(value))
    for name in _ARTIFACTS if output_dir is not None else ():
        path = Path(output_dir) / name  # type: ignore[arg-type]
        folder = str(Path(name).parent)
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path=None if folder == "." else folder)
    client.set_terminated(run_id, _TERMINAL_STATUS.get(status, "FAILED"))
