"""``fedinfer simulate``: Hydra's command line in front of :func:`run_simulation`.

Hydra owns the arguments, so every override, ``-m`` multirun, ``--cfg job``,
``hydra.run.dir=...`` and sweeper/launcher plugin works as Hydra users expect.
A user mistake ends the run with one line and exit code 2; in a multirun the
failing job is recorded as failed in its own ``results.json`` and the sweep
carries on.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedinfer.config.schema import FedInferConfig
from fedinfer.config.store import check_moved_keys, conf_dir, register_configs
from fedinfer.errors import ConfigError, FedInferError
from fedinfer.reporting.text import FILE_ONLY

__all__ = ["hydra_simulate", "simulate_job"]


def simulate_job(cfg: DictConfig) -> float | None:
    """One Hydra job: convert to the typed config, run, then serve.

    Returns the final accuracy, or for a task without one (regression) minus the final RMSE, so
    that larger is better for every task (Optuna's ``direction: maximize``).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fedinfer.reporting.results import RESULTS_FILE, write_json_atomic
    from fedinfer.simulation.run import run_simulation
    from fedinfer.simulation.summary import finish_job

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    _quiet_libraries()
    typed: object = None
    try:
        typed = OmegaConf.to_object(cfg)
        assert isinstance(typed, FedInferConfig)
        _share_cpus(typed)
        if typed.tracking.run_name is None:
            typed.tracking.run_name = HydraConfig.get().job.override_dirname or None
        result = run_simulation(typed, output_dir=output_dir)
        finish_job(typed, result.results, output_dir=result.output_dir)  # serving, summary
        rmse = result.final_metrics.get("rmse")
        if result.final_accuracy is None and rmse is not None:
            return -rmse
        return result.final_accuracy
    except (FedInferError, Exception) as exc:
        is_user_error = isinstance(exc, FedInferError)
        if isinstance(typed, FedInferConfig):
            from fedinfer.reporting.tracking import finish_run

            finish_run(typed, status="failed")
        write_json_atomic(
            output_dir / RESULTS_FILE,
            {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "overrides": list(HydraConfig.get().overrides.task),
                "rounds": [],
                "final_accuracy": None,
            },
        )
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            print(f"fedinfer simulate: job failed: {exc}", file=sys.stderr)
            if not is_user_error:
                traceback.print_exc()
            return None
        raise


def _share_cpus(cfg: FedInferConfig) -> None:
    """In a parallel sweep, keep this job (torch threads, its Ray instance) to its CPU share."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fedinfer.simulation.sweeps import (
        available_cpus,
        job_cpu_share,
        launcher_jobs,
        scheduled_launcher,
    )

    launcher = HydraConfig.get().launcher
    if HydraConfig.get().mode == RunMode.MULTIRUN and scheduled_launcher(launcher):
        _use_job_allocation(cfg, launcher_target=str(launcher.get("_target_")))
        return
    n_jobs = launcher_jobs(HydraConfig.get().launcher)
    if n_jobs is None or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    cores, client_cpus = available_cpus(), cfg.federation.client_cpus
    share = job_cpu_share(n_jobs=n_jobs, cores=cores, client_cpus=client_cpus)
    import torch

    torch.set_num_threads(share)
    if cfg.simulation.num_cpus is None:
        cfg.simulation.num_cpus = share


def _use_job_allocation(cfg: FedInferConfig, *, launcher_target: str) -> None:
    """A scheduled job (Slurm, Ray launcher) uses exactly the CPUs its launcher asked for."""
    import torch

    if "hydra_ray_launcher" in launcher_target and cfg.simulation.runtime == "ray":
        # Flower's Ray runtime inside a Ray task never got its actors here (hung for minutes).
        raise ConfigError(
            "`simulation.runtime`=ray cannot run inside a job of hydra/launcher=ray_cluster "
            "(each job already is a Ray task); set simulation.runtime=inprocess, or use "
            "hydra/launcher=slurm or simulation.ray_address for Ray"
        )

    job_cpus = cfg.simulation.job_cpus
    if job_cpus < 1 or job_cpus < cfg.federation.client_cpus:
        raise ConfigError(
            f"`simulation.job_cpus`={job_cpus} must be >= 1 and >= `federation.client_cpus`="
            f"{cfg.federation.client_cpus} (one site per job at least); raise simulation.job_cpus"
        )
    torch.set_num_threads(job_cpus)
    if cfg.simulation.num_cpus is None and cfg.simulation.ray_address is None:
        cfg.simulation.num_cpus = job_cpus


class _OursOrWarnings(logging.Filter):
    """Pass fedinfer's records, and other libraries' warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("fedinfer")


class _NotShownTwice(logging.Filter):
    """Keep lines the terminal already shows (rich) out of console handlers: files only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, FILE_ONLY, False)


def _quiet_libraries() -> None:
    """Hydra logs every library's INFO records; keep fedinfer's and everyone's warnings.

    A filter on Hydra's handlers, not logger levels: Ray and Flower's link-state
    migrations reconfigure logger levels while a simulation starts.
    """
    logging.getLogger("fedinfer").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _OursOrWarnings) for f in handler.filters):
            handler.addFilter(_OursOrWarnings())
        is_console = not isinstance(handler, logging.FileHandler)
        if is_console and not any(isinstance(f, _NotShownTwice) for f in handler.filters):
            handler.addFilter(_NotShownTwice())


_HELP = """\
usage: fedinfer simulate [-m] [--cfg job] [OVERRIDE ...]

Run a federation in Flower's simulation runtime, then serve the global model at every site.
The config is composed from conf/ (config.yaml and one option per config group), then the
overrides; every key is typed by fedinfer/config/schema.py. Output: outputs/DATE/TIME/.

overrides:
  GROUP=OPTION        pick a config group option, e.g. privacy=none model=mlp
  KEY=VALUE           set a key, e.g. federation.num_sites=5 federation.rounds=10
  +KEY=VALUE          add a key under a free-form mapping, e.g. +model.kwargs.dropout=0.1
  ~KEY                remove a key
  KEY=A,B,C with -m   a sweep: one job per value (per combination), e.g. -m seed=1,2,3
  hydra.run.dir=DIR   where a single run writes (a sweep: hydra.sweep.dir=DIR)

options:
  -h, --help          show this help message and exit
  -m, --multirun      run a sweep (Hydra multirun); see also `fedinfer sweep`
  --cfg job           print the composed config and exit (--cfg all: Hydra's too)
  --info              Hydra's config search path, defaults tree and plugins
  --hydra-help        Hydra's own flags (--config-dir, --config-name, shell completion ...)
"""


def simulate_help(conf: Path) -> str:
    """``fedinfer simulate --help``: usage, overrides, config groups and keys (no torch import)."""
    import shutil

    import yaml

    from fedinfer.config.overrides import config_groups, schema_keys

    width = min(shutil.get_terminal_size().columns, 100) if sys.stdout.isatty() else 100
    defaults: dict[str, str] = {}
    for entry in yaml.safe_load((conf / "config.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict):
            defaults.update({str(k): str(v) for k, v in entry.items()})
    lines = [_HELP, "config groups (GROUP=OPTION; * the default):"]
    for group, options in config_groups(conf).items():
        marked = ", ".join(f"{o}*" if o == defaults.get(group) else o for o in options)
        lines += _wrapped(group, marked, width)
    keys, _ = schema_keys()
    sections: dict[str, list[str]] = {}
    for key in keys:
        section, _, rest = key.partition(".")
        if rest and "." not in rest:
            sections.setdefault(section, []).append(rest)
    lines += ["", "config keys (KEY=VALUE; `fedinfer simulate --cfg job` shows every value):"]
    for section, names in sections.items():
        lines += _wrapped(section, ", ".join(names), width)
    top = [k for k in keys if "." not in k and k not in sections]
    lines += _wrapped("(top level)", ", ".join(top), width)
    lines += [
        "",
        "examples:",
        "  fedinfer simulate privacy=none secagg=off federation.rounds=5",
        "  fedinfer simulate -m privacy.noise_multiplier=0.8,1.2 seed=1,2",
        "  fedinfer simulate --cfg job model=mlp",
    ]
    return "\n".join(lines)


def _wrapped(name: str, text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(
        text,
        width=width,
        initial_indent=f"  {name:<18}",
        subsequent_indent=" " * 20,
        break_on_hyphens=False,
    )


def _error(message: object) -> int:
    print(f"fedinfer simulate: error: {message}", file=sys.stderr)
    print("Try 'fedinfer simulate --help'.", file=sys.stderr)
    return 2


def _preflight(args: Sequence[str], conf: Path) -> None:
    """Check Hydra's flags and the overrides before Hydra runs anything (ConfigError)."""
    from hydra._internal.utils import get_args_parser

    from fedinfer.config.overrides import check_overrides

    known, unknown = get_args_parser().parse_known_args(list(args))
    if unknown:
        raise ConfigError(
            f"unknown option {unknown[0]!r} (fedinfer simulate takes -m, --cfg, --info and "
            "Hydra's flags listed by --hydra-help)"
        )
    if known.config_path is not None or known.experimental_rerun is not None:
        return  # another primary config: its keys are not ours to check
    extra = Path(known.config_dir) if known.config_dir else None
    check_overrides(known.overrides, conf=conf, extra_conf=extra)


def hydra_simulate(args: Sequence[str]) -> int:
    """Run ``fedinfer simulate ARGS`` and return the process exit code.

    Every mistake in the arguments (an unknown key or group option, a value of the wrong
    type, a ``+key`` the schema does not have, an unknown flag) is one line on stderr and
    exit code 2, found before any job of a ``-m`` sweep starts.
    """
    try:
        conf = conf_dir()
    except FedInferError as exc:
        return _error(exc)
    if "-h" in args or "--help" in args:
        print(simulate_help(conf))
        return 0
    try:
        check_moved_keys(args)
        _preflight(args, conf)
    except ConfigError as exc:
        return _error(exc)
    return _run_hydra(args, conf)


def _run_hydra(args: Sequence[str], conf: Path) -> int:
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    status = {"code": 0}

    @hydra.main(version_base=None, config_path=str(conf), config_name="config")
    def _main(cfg: DictConfig) -> float | None:
        try:
            return simulate_job(cfg)
        except FedInferError as exc:
            status["code"] = _error(exc)
            return None

    saved_argv, saved_full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = ["fedinfer simulate", *args]
    # Hydra prints its own errors over several lines and exits 1 unless HYDRA_FULL_ERROR
    # is set, in which case they reach us: one line and exit 2, like every user mistake.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _main()
    except (HydraException, OmegaConfBaseException) as exc:
        return _error(_hydra_message(exc))
    except SystemExit as exc:  # argparse inside Hydra, --version, --hydra-help
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    finally:
        sys.argv = saved_argv
        if saved_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error
    return status["code"]


def _hydra_message(exc: BaseException) -> str:
    """Hydra's error on one line: its first sentence and, for a missing option, the options."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    message = lines[0].rstrip(".")
    if "Available options in" in str(exc):
        options = [
            line for line in lines[lines.index(next(x for x in lines if "Available" in x)) + 1 :]
            if " " not in line and "=" not in line
        ]
        message += f" (choose one of {', '.join(options)})"
    return message
