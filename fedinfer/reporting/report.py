"""``fedinfer report``: a sweep's table (CSV and terminal) and its plots, in the sweep directory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedinfer.reporting.sweep import (
    JobResult,
    job_labels,
    load_sweep,
    report_table,
    seed_summary,
    swept_keys,
)
from fedinfer.reporting.sweep_plots import (
    ACCURACY_PLOT,
    PRIVACY_UTILITY_PLOT,
    SEEDS_PLOT,
    plot_accuracy_by_round,
    plot_privacy_utility,
    plot_seed_spread,
)

__all__ = ["REPORT_CSV", "SEEDS_CSV", "SweepReport", "print_report", "write_report"]

REPORT_CSV = "report.csv"
SEEDS_CSV = "report_seeds.csv"
_STATUS_STYLE = {"stopped": "yellow", "running": "yellow", "failed": "red", "missing": "red"}


@dataclass(frozen=True)
class SweepReport:
    """What ``fedinfer report`` found and wrote."""

    sweep_dir: Path
    jobs: list[JobResult]
    swept: list[str]
    constant: dict[str, str]
    """Overrides every job shares (not columns of the table)."""
    table: pd.DataFrame
    seeds: pd.DataFrame | None
    files: list[Path]


def write_report(
    sweep_dir: Path, *, target: float | None = None, plots: bool = True
) -> SweepReport:
    """Summarise every job under ``sweep_dir``: write ``report.csv`` (and plots) there.

    Examples
    --------
    >>> report = write_report(Path("multirun/privacy_utility/2026-01-01_12-00"))  # doctest: +SKIP
    >>> report.table[["privacy.noise_multiplier", "final_accuracy"]]  # doctest: +SKIP
    """
    sweep_dir = Path(sweep_dir)
    jobs = load_sweep(sweep_dir)
    keys = swept_keys(jobs)
    table = report_table(jobs, target=target)
    seeds = seed_summary(table, keys)
    files = [sweep_dir / REPORT_CSV]
    table.to_csv(files[0], index=False)
    if seeds is not None:
        seeds.to_csv(sweep_dir / SEEDS_CSV, index=False)
        files.append(sweep_dir / SEEDS_CSV)
    if plots:
        labels = job_labels(jobs, keys)
        drawn = [
            plot_accuracy_by_round(jobs, labels, sweep_dir / ACCURACY_PLOT),
            plot_privacy_utility(jobs, labels, sweep_dir / PRIVACY_UTILITY_PLOT, seeds=seeds),
            plot_seed_spread(jobs, keys, sweep_dir / SEEDS_PLOT),
        ]
        files += [p for p in drawn if p is not None]
    shared = {
        k: v for k, v in jobs[0].overrides.items() if all(j.overrides.get(k) == v for j in jobs)
    }
    return SweepReport(sweep_dir, jobs, keys, shared, table, seeds, files)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e3 else f"{value:.0f}"
    return str(value)


def _header(column: str, swept: list[str]) -> str:
    """Short terminal headers; the CSV keeps the full names."""
    if column in swept:
        short = column.rsplit(".", 1)[-1]
        return short if sum(k.rsplit(".", 1)[-1] == short for k in swept) == 1 else column
    for long, brief in (
        ("_accuracy", " acc"),
        ("max_epsilon", "max eps"),
        ("elapsed_s", "wall s"),
        ("rounds_to_", "rounds to "),
    ):
        column = column.replace(long, brief)
    return column.replace("_", " ")


def _rich_table(
    frame: pd.DataFrame, swept: list[str], title: str, caption: str | None = None
) -> Table:
    """Values never wrap (headers may); errors are listed under the table, not in it."""
    frame = frame.drop(columns=["error"], errors="ignore")
    cells = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    table = Table(title=title, caption=caption, header_style="bold")
    for index, column in enumerate(frame.columns):
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        width = max((len(row[index]) for row in cells), default=1)
        table.add_column(
            _header(str(column), swept),
            justify="right" if numeric else "left",
            min_width=width,
            overflow="fold",
        )
    for row, values in zip(frame.itertuples(index=False), cells, strict=True):
        table.add_row(
            *(escape(c) for c in values), style=_STATUS_STYLE.get(str(getattr(row, "status", "")))
        )
    return table


def _seeds_for_terminal(seeds: pd.DataFrame) -> pd.DataFrame:
    """``mean ± std`` in one cell per metric, so the table fits a terminal."""
    frame = seeds.loc[:, [c for c in seeds.columns if not c.endswith(("_mean", "_std"))]].copy()
    metrics = [c.removesuffix("_mean") for c in seeds.columns if c.endswith("_mean")]
    for metric in metrics:  # final_accuracy, best_accuracy, (final_rmse ...), max_epsilon
        frame[metric] = [
            "-" if pd.isna(m) else f"{_cell(m)} ± {_cell(sd)}"
            for m, sd in zip(seeds[f"{metric}_mean"], seeds[f"{metric}_std"], strict=True)
        ]
    return frame


def print_report(report: SweepReport, console: Console | None = None) -> None:
    """Show the report as rich tables, then where the files went."""
    if console is None:
        from fedinfer.console import make_console

        console = make_console()
    shared = " ".join(f"{k}={v}" for k, v in report.constant.items())
    console.print(
        _rich_table(
            report.table,
            report.swept,
            f"Sweep {report.sweep_dir}",
            escape(f"all jobs: {shared}") if shared else None,
        )
    )
    if report.seeds is not None:
        console.print(
            _rich_table(_seeds_for_terminal(report.seeds), report.swept, "Mean ± std over seeds")
        )
    for job in report.jobs:
        if job.error and job.status != "completed":
            console.print(f"[red]job {escape(job.job)} {job.status}:[/] {escape(job.error)}")
    counts = report.table["status"].value_counts().to_dict()
    console.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    for path in report.files:
        console.print(f"wrote {path}")
