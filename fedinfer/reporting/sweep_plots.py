"""Sweep plots: accuracy per round, the privacy-utility frontier, and the spread over seeds;
for a task without accuracy, its headline metric (a regression's RMSE) in all three.

Each function writes one PNG and returns its path, or None when the sweep has
nothing to draw for it (no evaluated round, no DP job, no swept seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedinfer.reporting.sweep import SEED_KEY, JobResult

__all__ = [
    "ACCURACY_PLOT",
    "PRIVACY_UTILITY_PLOT",
    "SEEDS_PLOT",
    "headline_curves",
    "headline_metric",
    "pareto_frontier",
    "plot_accuracy_by_round",
    "plot_privacy_utility",
    "plot_seed_spread",
]

ACCURACY_PLOT = "accuracy_by_round.png"
PRIVACY_UTILITY_PLOT = "privacy_utility.png"
SEEDS_PLOT = "seeds.png"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _legend(ax: Any, count: int) -> None:
    if count <= 12:
        ax.legend(fontsize="small")
    else:  # a big grid: a legend outside the axes instead of over the curves
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def headline_curves(
    jobs: Sequence[JobResult],
) -> tuple[str, list[tuple[JobResult, list[tuple[int, float]]]]]:
    """The metric to plot by round and each job's ``(round, value)`` curve of it.

    Global accuracy when a job has it; for a task without accuracy (regression) its
    headline metric, the first of each round's ``metrics`` (``rmse``: see
    :class:`fedinfer.tasks.TaskSpec`). Jobs of another metric (a sweep mixing tasks) are
    left out of the curves.

    Examples
    --------
    >>> job = JobResult("0", {}, "completed", rounds=[
    ...     {"round": 1, "accuracy": None, "metrics": {"rmse": 0.9, "mae": 0.7}}])
    >>> headline_curves([job])[0], headline_curves([job])[1][0][1]
    ('rmse', [(1, 0.9)])
    """
    metric = headline_metric(jobs)
    curves = [(job, job.metric_curve(metric)) for job in jobs]
    return metric, [(job, curve) for job, curve in curves if curve]


def headline_metric(jobs: Sequence[JobResult]) -> str:
    """``accuracy`` when any job has it, else the first metric of any round (``rmse`` ...)."""
    if any(job.accuracy_curve() for job in jobs):
        return "accuracy"
    return next((name for job in jobs for r in job.rounds for name in (r.get("metrics") or {})), "")


def _lower_is_better(metric: str) -> bool:
    return metric in ("rmse", "mae", "loss")


def _axis_label(metric: str, *, final: bool = False) -> str:
    prefix = "final" if final else "global"
    if metric == "accuracy":
        return f"{prefix} accuracy"
    return f"{prefix} {metric} ({'lower' if _lower_is_better(metric) else 'higher'} is better)"


def _set_range(ax: Any, metric: str) -> None:
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    elif _lower_is_better(metric):
        ax.set_ylim(bottom=0)


def plot_accuracy_by_round(
    jobs: Sequence[JobResult], labels: Mapping[str, str], path: Path
) -> Path | None:
    """One line of global accuracy against round per job (of the headline metric, e.g.
    ``rmse``, for a task without accuracy: :func:`headline_curves`)."""
    metric, curves = headline_curves(jobs)
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for job, curve in curves:
        ax.plot(*zip(*curve, strict=True), marker="o", markersize=3, label=labels[job.job])
    ax.set(xlabel="round", ylabel=_axis_label(metric), title=f"{_title(metric)} per round")
    _set_range(ax, metric)
    ax.grid(alpha=0.3)
    _legend(ax, len(curves))
    return _save(fig, path)


def _title(metric: str) -> str:
    return metric.upper() if metric in ("rmse", "mae") else metric.capitalize()


def pareto_frontier(
    points: Sequence[tuple[float, float]], *, lower_is_better: bool = False
) -> list[tuple[float, float]]:
    """The (epsilon, utility) points no other point beats: lower or equal epsilon, better utility.

    Examples
    --------
    >>> pareto_frontier([(1.0, 0.5), (2.0, 0.4), (3.0, 0.7)])
    [(1.0, 0.5), (3.0, 0.7)]
    >>> pareto_frontier([(1.0, 0.5), (2.0, 0.6), (3.0, 0.3)], lower_is_better=True)
    [(1.0, 0.5), (3.0, 0.3)]
    """
    sign = -1.0 if lower_is_better else 1.0
    frontier: list[tuple[float, float]] = []
    for eps, value in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not frontier or sign * value > sign * frontier[-1][1]:
            frontier.append((eps, value))
    return frontier


def plot_privacy_utility(
    jobs: Sequence[JobResult],
    labels: Mapping[str, str],
    path: Path,
    *,
    seeds: pd.DataFrame | None = None,
) -> Path | None:
    """Final accuracy (a regression's RMSE ...: :func:`headline_metric`) against epsilon spent:
    each DP job's trajectory, its end point, the frontier.

    Jobs without DP (no epsilon) are drawn as horizontal reference lines. With
    ``seeds`` (see :func:`~fedinfer.reporting.sweep.seed_summary`), group means
    are drawn with one-standard-deviation error bars on both axes.
    """
    metric = headline_metric(jobs)
    dp_jobs = [job for job in jobs if job.epsilon_curve(metric)]
    if not dp_jobs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    ends = []
    for job in dp_jobs:
        curve = job.epsilon_curve(metric)
        line = ax.plot(*zip(*curve, strict=True), alpha=0.35, linewidth=1)[0]
        ax.scatter(*curve[-1], color=line.get_color(), zorder=3, label=labels[job.job])
        ends.append(curve[-1])
    frontier = pareto_frontier(ends, lower_is_better=_lower_is_better(metric))
    frontier.append(
        (max(eps for eps, _ in ends), frontier[-1][1])
    )  # carry the best level to the right
    ax.step(
        *zip(*frontier, strict=True), where="post", color="black", linestyle="--", label="frontier"
    )
    if max(e for e, _ in ends) > 20 * min(e for e, _ in ends):
        ax.set_xscale("log")
    for job in jobs:
        curve = job.metric_curve(metric)
        if not job.epsilon_curve(metric) and curve:
            ax.axhline(curve[-1][1], color="grey", linestyle=":", label=f"no DP: {labels[job.job]}")
    column = f"final_{metric}_mean"
    with_seeds = seeds is not None and len(seeds) and column in seeds
    if with_seeds and seeds["max_epsilon_mean"].notna().any():
        _seed_errorbars(ax, seeds, metric)
    ax.set(
        xlabel="epsilon spent (most-spent site)",
        ylabel=_axis_label(metric),
        title="Privacy-utility trade-off",
    )
    _set_range(ax, metric)
    ax.grid(alpha=0.3)
    _legend(ax, len(dp_jobs) + 1)
    return _save(fig, path)


def _seed_errorbars(ax: Any, seeds: pd.DataFrame, metric: str) -> None:
    rows = seeds[seeds["max_epsilon_mean"].notna()]
    ax.errorbar(
        rows["max_epsilon_mean"],
        rows[f"final_{metric}_mean"],
        xerr=rows["max_epsilon_std"],
        yerr=rows[f"final_{metric}_std"],
        fmt="s",
        color="black",
        capsize=3,
        label="mean ± std over seeds",
    )


def plot_seed_spread(jobs: Sequence[JobResult], keys: Sequence[str], path: Path) -> Path | None:
    """Mean accuracy (a regression's RMSE ...: :func:`headline_metric`) per round with a ±1 std
    band per group of jobs that differ only by seed."""
    if SEED_KEY not in keys:
        return None
    metric = headline_metric(jobs)
    group_keys = [k for k in keys if k != SEED_KEY]
    groups: dict[str, list[JobResult]] = {}
    for job in jobs:
        if job.metric_curve(metric):
            name = ", ".join(
                f"{k.rsplit('.', 1)[-1]}={job.overrides.get(k, '-')}" for k in group_keys
            )
            groups.setdefault(name or "all jobs", []).append(job)
    if not groups:
        return None
    plt = _pyplot()
    fig, (ax_round, ax_final) = plt.subplots(1, 2, figsize=(12, 5))
    for index, (name, members) in enumerate(sorted(groups.items())):
        rounds, mean, std = _mean_curve(members, metric)
        line = ax_round.plot(rounds, mean, label=f"{name} (n={len(members)})")[0]
        ax_round.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        finals = np.array([m.metric_curve(metric)[-1][1] for m in members])
        ax_final.errorbar(
            index, finals.mean(), yerr=finals.std(), fmt="o", capsize=4, color=line.get_color()
        )
        ax_final.scatter([index] * len(finals), finals, color=line.get_color(), alpha=0.4, s=12)
    ax_round.set(xlabel="round", ylabel=_axis_label(metric), title="Mean ± std over seeds")
    _set_range(ax_round, metric)
    ax_round.grid(alpha=0.3)
    _legend(ax_round, len(groups))
    ax_final.set_xticks(
        range(len(groups)), sorted(groups), rotation=30, ha="right", fontsize="small"
    )
    ax_final.set(ylabel=_axis_label(metric, final=True), title=f"Final {metric} over seeds")
    _set_range(ax_final, metric)
    ax_final.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _mean_curve(
    members: Sequence[JobResult], metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-round mean and std of ``metric`` over the jobs that reached each round."""
    by_round: dict[int, list[float]] = {}
    for job in members:
        for rnd, value in job.metric_curve(metric):
            by_round.setdefault(rnd, []).append(value)
    rounds = np.array(sorted(by_round))
    values = [np.array(by_round[r]) for r in rounds]
    return rounds, np.array([v.mean() for v in values]), np.array([v.std() for v in values])
