"""``fedinfer report`` and ``fedinfer sweep``: experiment studies in one command.

``fedinfer sweep NAME [OVERRIDES...]`` runs a ready-made sweep from
``simulations/`` as a Hydra multirun, then reports on it;
``fedinfer report SWEEP_DIR`` summarizes any multirun directory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedinfer.errors import ConfigError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``report`` and ``sweep`` sub-commands."""
    report = subparsers.add_parser(
        "report",
        help="summarize a sweep: table (report.csv) and plots in the sweep directory",
        description="One row per Hydra job of SWEEP_DIR (failed jobs included): swept parameters "
        "against final/best accuracy, rounds to --target, max epsilon, wall time and status; "
        "writes report.csv and plots (accuracy per round, privacy-utility, seeds) into SWEEP_DIR.",
    )
    report.add_argument(
        "sweep_dir",
        type=Path,
        metavar="SWEEP_DIR",
        help="a `fedinfer simulate -m` output directory",
    )
    _add_report_options(report)
    report.set_defaults(func=_report)

    sweep = subparsers.add_parser(
        "sweep",
        help="run a ready-made sweep from simulations/ (Hydra overrides follow), then report",
        description="Run sweep NAME (a YAML in simulations/, or a path to one) as a Hydra "
        "multirun. "
        "Options go before NAME; everything after NAME is passed to Hydra unchanged.",
    )
    sweep.add_argument("name", nargs="?", metavar="NAME", help="sweep name (omit to list them)")
    sweep.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="OVERRIDES",
        help="Hydra overrides, e.g. federation.rounds=5 seed=1,2,3",
    )
    sweep.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="run N jobs at once with Hydra's joblib launcher (default: one at a time); "
        "needs N * federation.client_cpus <= CPUs",
    )
    sweep.add_argument("--no-report", dest="report", action="store_false", help="skip the report")
    _add_report_options(sweep)
    sweep.set_defaults(func=_sweep)


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        metavar="ACC",
        help="also report the first round reaching this global accuracy, e.g. 0.8",
    )
    parser.add_argument(
        "--no-plots", dest="plots", action="store_false", help="write the table only"
    )


def _report(args: argparse.Namespace) -> int:
    from fedinfer.reporting.report import print_report, write_report

    if args.target is not None and not 0 < args.target <= 1:
        raise ConfigError(f"`--target` is an accuracy in (0, 1] (got {args.target})")
    print_report(write_report(args.sweep_dir, target=args.target, plots=args.plots))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from fedinfer.console import make_console
    from fedinfer.simulation.hydra_main import hydra_simulate
    from fedinfer.simulation.summary import JOB_FAILED
    from fedinfer.simulation.sweeps import (
        available_sweeps,
        explicit_sweep_dir,
        inspects_only,
        resolve_sweep,
        split_hydra_args,
        sweep_arguments,
        sweep_description,
    )

    if args.name is None:
        _list_sweeps(available_sweeps())
        return 0
    if args.jobs is not None and args.jobs == 0:
        raise ConfigError(
            "`--jobs` must be a positive number of parallel jobs, or -1 for one per CPU"
        )
    path = resolve_sweep(args.name)
    sweep_dir = Path("multirun") / path.stem / time.strftime("%Y-%m-%d_%H-%M-%S")
    make_console().print(
        f"[bold]sweep {path.stem}[/]: {escape(sweep_description(path))}"
    )
    code = hydra_simulate(
        sweep_arguments(path, args.overrides, sweep_dir=sweep_dir, jobs=args.jobs)
    )
    written = explicit_sweep_dir(args.overrides)
    report_dir = Path(written) if written is not None else sweep_dir
    if code not in (0, JOB_FAILED) or not args.report:
        return code  # JOB_FAILED: some jobs failed; the report shows them
    if inspects_only(split_hydra_args(args.overrides)[0]):
        return code
    if "${" in str(report_dir) or not report_dir.is_dir():
        make_console().print(
            f"run `fedinfer report <sweep dir>` on the directory Hydra wrote ({report_dir})"
        )
        return code
    args.sweep_dir = report_dir
    return _report(args) or code


def _list_sweeps(sweeps: dict[str, Path]) -> None:
    from rich.markup import escape

    from fedinfer.console import make_console
    from fedinfer.simulation.sweeps import sweep_description, sweeps_dir

    console = make_console()
    if not sweeps:
        console.print(f"no sweeps in {sweeps_dir()}")
        return
    console.print("Ready-made sweeps (fedinfer sweep NAME \\[OVERRIDES...]):", style="bold")
    for name, path in sweeps.items():
        console.print(f"  {name:<20} {escape(sweep_description(path))}")
