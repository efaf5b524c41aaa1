"""``fedinfer report``: a sweep's table (CSV + terminal) and its plots, written into the sweep directory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
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
_STATUS_STYLE = {"completed": "green", "stopped": "yellow", "failed": "bold red", "missing": "bold red"}


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


def write_report(sweep_dir: Path, *, target: float | None = None, plots: bool = True) -> SweepReport:
    """Summarise every job under ``sweep_dir``: write ``report.csv`` (and plots) there.

    Examples
    --------
    >>> report = write_report(Path("multirun/privacy_utility/2026-01-01_12-00-00"), target=0.8)  # doctest: +SKIP
    >>> report.table[["privacy.noise_multiplier", "final_accuracy", "max_epsilon"]]  # doctest: +SKIP
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
    shared = {k: v for k, v in jobs[0].overrides.items() if all(j.overrides.get(k) == v for j in jobs)}
    return SweepReport(sweep_dir, jobs, keys, shared, table, seeds, files)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _rich_table(frame: pd.DataFrame, title: str, caption: str | None = None) -> Table:
    table = Table(title=title, caption=caption, header_style="bold", show_lines=False)
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        table.add_column(str(column), justify="right" if numeric else "left",
                         overflow="fold", max_width=60 if column == "error" else None)
    for row in frame.itertuples(index=False):
        cells = [_cell(v) for v in row]
        style = _STATUS_STYLE.get(getattr(row, "status", ""), "")
        table.add_row(*cells, style=style if style.endswith("red") else None)
    return table


def print_report(report: SweepReport, console: Console | None = None) -> None:
    """Show the report as rich tables, then where the files went."""
    console = console or Console()
    shared = " ".join(f"{k}={v}" for k, v in report.constant.items())
    console.print(_rich_table(report.table, f"Sweep {report.sweep_dir}",
                              f"all jobs: {shared}" if shared else None))
    if report.seeds is not None:
        console.print(_rich_table(report.seeds, "Mean and spread over seeds"))
    counts = report.table["status"].value_counts().to_dict()
    console.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    for path in report.files:
        console.print(f"wrote {path}")
