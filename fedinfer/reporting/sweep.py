"""Sweep summaries: one row per Hydra job of a multirun, whatever became of the job.

A job is a directory under the sweep directory holding ``.hydra/`` or
``results.json``. Its parameters come from ``.hydra/overrides.yaml`` (else the
``overrides`` a failed job recorded); the *swept* parameters are those whose
value differs between jobs. A job that failed, was killed, or is still running
gets a row with that status: nothing is dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fedinfer.errors import DataError
from fedinfer.reporting.results import RESULTS_FILE
from fedinfer.reporting.text import plural

__all__ = [
    "SEED_KEY",
    "JobResult",
    "is_failure",
    "job_labels",
    "load_sweep",
    "report_table",
    "seed_summary",
    "swept_keys",
    "tally_lines",
    "target_column",
]

SEED_KEY = "seed"


@dataclass(frozen=True)
class JobResult:
    """What one job of a sweep produced (or why it did not)."""

    job: str
    """The job's directory relative to the sweep directory (``0``, ``1`` ...)."""
    overrides: dict[str, str]
    status: str
    """``completed``, ``stopped``, ``failed``, ``running`` (not finalised) or ``missing``."""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final_accuracy: float | None = None
    best_accuracy: float | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    """Every held-out metric of the task after the last round (rmse, mae, r2; f1, auc ...)."""
    max_epsilon: float | None = None
    elapsed_s: float | None = None
    error: str | None = None
    config: dict[str, Any] | None = None
    """The job's resolved config (``.hydra/config.yaml``), if Hydra wrote one."""

    def accuracy_curve(self) -> list[tuple[int, float]]:
        """``(round, global accuracy)`` for every evaluated round."""
        return self.metric_curve("accuracy")

    def metric_curve(self, metric: str) -> list[tuple[int, float]]:
        """``(round, value)`` of a global metric (``accuracy``, ``rmse`` ...) per round."""
        return [
            (int(r["round"]), float(value))
            for r in self.rounds
            if _number(value := _round_metric(r, metric))
        ]

    def epsilon_curve(self, metric: str = "accuracy") -> list[tuple[float, float]]:
        """``(epsilon spent so far by the most-spent site, metric)`` per round, for DP runs."""
        curve, spent = [], 0.0
        for r in self.rounds:
            spent = max([spent, *(e for e in (r.get("epsilon") or {}).values() if _number(e))])
            if spent > 0 and _number(value := _round_metric(r, metric)):
                curve.append((spent, float(value)))
        return curve

    def rounds_to(self, target: float) -> int | None:
        """The first round whose global accuracy reached ``target`` (None: never)."""
        return next((rnd for rnd, acc in self.accuracy_curve() if acc >= target), None)


def _round_metric(record: dict[str, Any], metric: str) -> Any:
    """A round's global ``accuracy``, or another metric of its task (``metrics``)."""
    if metric == "accuracy":
        return record.get("accuracy")
    return (record.get("metrics") or {}).get(metric)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_sweep(sweep_dir: Path) -> list[JobResult]:
    """Every job under ``sweep_dir`` (a multirun directory, or a single run's directory).

    Raises :class:`~fedinfer.errors.DataError` when ``sweep_dir`` holds no job.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DataError(
            f"sweep directory {sweep_dir} does not exist; pass the directory "
            "`fedinfer simulate -m` / `fedinfer sweep` wrote (hydra.sweep.dir)"
        )
    job_dirs = {p.parent for p in sweep_dir.rglob(RESULTS_FILE)}
    job_dirs |= {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    if not job_dirs:
        raise DataError(
            f"no Hydra job found under {sweep_dir} (no .hydra/ or {RESULTS_FILE}); "
            "pass the directory `fedinfer simulate -m` / `fedinfer sweep` wrote"
        )
    return [_load_job(d, sweep_dir) for d in sorted(job_dirs, key=lambda d: _natural(d, sweep_dir))]


def _natural(job_dir: Path, root: Path) -> tuple[tuple[int, int, str], ...]:
    """Sort key putting job ``10`` after job ``9``."""
    return tuple(
        (0, int(p), "") if p.isdigit() else (1, 0, p) for p in job_dir.relative_to(root).parts
    )


def _load_job(job_dir: Path, root: Path) -> JobResult:
    name = str(job_dir.relative_to(root)) if job_dir != root else "."
    results_path = job_dir / RESULTS_FILE
    data: dict[str, Any] = {}
    error: str | None = None
    if not results_path.is_file():
        status, error = (
            "missing",
            f"no {RESULTS_FILE}: the job was killed before its first round ended",
        )
    else:
        try:
            data = json.loads(results_path.read_text())
            status = str(data.get("status", "running"))
        except (OSError, json.JSONDecodeError) as exc:
            status, error = "failed", f"unreadable {RESULTS_FILE}: {exc}"
    if status == "running":
        error = "not finalised: the job is still running, or was killed"
    return JobResult(
        job=name,
        overrides=_overrides(job_dir, data),
        status=status,
        rounds=list(data.get("rounds") or []),
        final_accuracy=_float(data.get("final_accuracy")),
        best_accuracy=_float(data.get("best_accuracy")),
        final_metrics={
            str(k): float(v) for k, v in (data.get("final_metrics") or {}).items() if _number(v)
        },
        max_epsilon=_float(data.get("max_epsilon")),
        elapsed_s=_float(data.get("elapsed_s")),
        error=data.get("error") or data.get("stop_reason") or error,
        config=_resolved_config(job_dir),
    )


def _resolved_config(job_dir: Path) -> dict[str, Any] | None:
    path = job_dir / ".hydra" / "config.yaml"
    try:
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return None
    return loaded if isinstance(loaded, dict) else None


def _float(value: Any) -> float | None:
    return float(value) if _number(value) else None


def _overrides(job_dir: Path, data: dict[str, Any]) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    items: Sequence[str] = data.get("overrides") or []
    if path.is_file():
        items = yaml.safe_load(path.read_text()) or []
    parsed: dict[str, str] = {}
    for item in items:
        key, _, value = str(item).partition("=")
        parsed[key.lstrip("+")] = value
    return parsed


def swept_keys(jobs: Sequence[JobResult]) -> list[str]:
    """Override keys whose value differs between jobs, in the order they first appear.

    Values are compared in each job's resolved config (``.hydra/config.yaml``) when
    every job has one, so ``secagg=off`` given to one job and set by the sweep file
    for the others is not a swept key; else the override strings are compared.
    """
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    resolved = all(job.config is not None for job in jobs)

    def value(job: JobResult, key: str) -> str | None:
        if not resolved:
            return job.overrides.get(key)
        node: Any = job.config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return json.dumps(node, sort_keys=True, default=str)

    return [k for k in keys if len({value(job, k) for job in jobs}) > 1]


def job_labels(jobs: Sequence[JobResult], keys: Sequence[str]) -> dict[str, str]:
    """A short legend label per job: its swept values, keys shortened to their last part."""
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(short):
        short = {k: k for k in keys}
    return {
        job.job: ", ".join(f"{short[k]}={job.overrides[k]}" for k in keys if k in job.overrides)
        or f"job {job.job}"
        for job in jobs
    }


def report_table(jobs: Sequence[JobResult], *, target: float | None = None) -> pd.DataFrame:
    """One row per job: swept parameters, then status and the outcome columns.

    Columns: ``job``, each swept key, ``status``, ``rounds``, ``final_accuracy``,
    ``best_accuracy``, ``final_<metric>`` for a task without accuracy (``final_rmse``,
    ``final_mae``, ``final_r2``), ``rounds_to_<target>`` (with ``target``), ``max_epsilon``,
    ``elapsed_s``, ``error``.
    """
    keys = swept_keys(jobs)
    # tasks without an accuracy (regression) get their own columns: final_rmse, final_mae ...
    extra = sorted({m for j in jobs if "accuracy" not in j.final_metrics for m in j.final_metrics})
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"job": job.job, **{k: job.overrides.get(k) for k in keys}}
        row.update(
            status=job.status,
            rounds=len(job.rounds),
            final_accuracy=job.final_accuracy,
            best_accuracy=job.best_accuracy,
        )
        row.update({f"final_{m}": job.final_metrics.get(m) for m in extra})
        if target is not None:
            row[target_column(target)] = job.rounds_to(target)
        row.update(max_epsilon=job.max_epsilon, elapsed_s=job.elapsed_s, error=job.error)
        rows.append(row)
    table = pd.DataFrame(rows)
    for key in keys:
        table[key] = _typed_column(table[key])
    if target is not None:
        table[target_column(target)] = table[target_column(target)].astype("Int64")
    return table


def target_column(target: float) -> str:
    """The name of the rounds-to-target column, e.g. ``rounds_to_0.8``."""
    return f"rounds_to_{target:g}"


def _typed_column(values: pd.Series) -> pd.Series:
    """Numbers where every value is one (so they sort and plot as numbers), else strings."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().sum() == values.notna().sum():
        return numeric
    return values.astype("string")


def seed_summary(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame | None:
    """Mean and spread over seeds: jobs grouped by every swept key except ``seed``.

    Returns None unless ``seed`` is swept. Failed jobs count in ``failed``, not in the means.
    """
    if SEED_KEY not in keys:
        return None
    group_keys = [k for k in keys if k != SEED_KEY]
    extra = [c for c in table.columns if c.startswith("final_") and c != "final_accuracy"]
    # a finished job has a final metric: accuracy, or e.g. final_rmse for regression
    finished = table.assign(ok=table[["final_accuracy", *extra]].notna().any(axis=1))
    grouped = (
        finished.groupby(group_keys, dropna=False, sort=True) if group_keys else [((), finished)]
    )
    rows = []
    for group, frame in grouped:
        values = group if isinstance(group, tuple) else (group,)
        ok = frame[frame["ok"]]
        row: dict[str, Any] = dict(zip(group_keys, values, strict=True))
        row.update(seeds=len(ok), failed=int((~frame["ok"]).sum()))
        for metric in ("final_accuracy", "best_accuracy", *extra, "max_epsilon"):
            row[f"{metric}_mean"] = ok[metric].mean() if len(ok) else None
            row[f"{metric}_std"] = ok[metric].std(ddof=0) if len(ok) else None
        rows.append(row)
    return pd.DataFrame(rows)


def is_failure(status: str) -> bool:
    """Whether a job with this status failed: ``failed``, or ``missing`` / ``running`` (killed)."""
    return status not in ("completed", "stopped")


def tally_lines(jobs: Sequence[JobResult], sweep_dir: Path) -> list[str]:
    """What a multirun did: ``N jobs: a completed, b failed -> DIR``, each failure, the next step.

    Examples
    --------
    >>> tally_lines([JobResult("0", {}, "completed"), JobResult("1", {}, "failed", error="bad")],
    ...             Path("/s"))  # doctest: +NORMALIZE_WHITESPACE
    ['Sweep: 2 jobs: 1 completed, 1 failed -> /s', '  job 1 failed: bad',
     'Summarize it: fedinfer report /s']
    """
    counts = {"completed": 0, "stopped": 0, "failed": 0}
    for job in jobs:
        counts["failed" if is_failure(job.status) else job.status] += 1
    parts = [f"{n} {s}" for s, n in counts.items() if n or s != "stopped"]
    lines = [f"Sweep: {plural(len(jobs), 'job')}: {', '.join(parts)} -> {sweep_dir}"]
    lines += [
        f"  job {job.job} {job.status}: {job.error or 'no error recorded'}"
        for job in jobs
        if is_failure(job.status)
    ]
    return [*lines, f"Summarize it: fedinfer report {sweep_dir}"]
