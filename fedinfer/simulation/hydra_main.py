"""``fedinfer simulate``: Hydra's command line in front of :func:`run_simulation`.

Hydra owns the arguments, so every override, ``-m`` multirun, ``--cfg job``,
``hydra.run.dir=...`` and sweeper/launcher plugin works as Hydra users expect.
A user mistake ends the run with one line and exit code 2; in a multirun the
failing job is recorded as failed in its own ``results.json`` and the sweep
carries on.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedinfer.config.schema import FedInferConfig
from fedinfer.config.store import check_moved_keys, conf_dir, register_configs
from fedinfer.errors import ConfigError, FedInferError

__all__ = ["hydra_simulate", "simulate_job"]


def simulate_job(cfg: DictConfig) -> float | None:
    """One Hydra job: convert to the typed config, run, then serve. Returns final accuracy."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fedinfer.reporting.results import RESULTS_FILE, write_json_atomic
    from fedinfer.simulation.run import run_simulation
    from fedinfer.simulation.serve_demo import serve_sites

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
        if typed.serving.enabled:
            serve_sites(typed, output_dir=output_dir)
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


def _quiet_libraries() -> None:
    """Hydra logs every library's INFO records; keep fedinfer's and everyone's warnings.

    A filter on Hydra's handlers, not logger levels: Ray and Flower's link-state
    migrations reconfigure logger levels while a simulation starts.
    """
    logging.getLogger("fedinfer").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _OursOrWarnings) for f in handler.filters):
            handler.addFilter(_OursOrWarnings())


def hydra_simulate(args: Sequence[str]) -> int:
    """Run ``fedinfer simulate ARGS`` and return the process exit code."""
    import hydra

    register_configs()
    try:
        check_moved_keys(args)
        config_path = str(conf_dir())
    except FedInferError as exc:
        print(f"fedinfer simulate: error: {exc}", file=sys.stderr)
        return 2
    status = {"code": 0}

    @hydra.main(version_base=None, config_path=config_path, config_name="config")
    def _main(cfg: DictConfig) -> float | None:
        try:
            return simulate_job(cfg)
        except FedInferError as exc:
            print(f"fedinfer simulate: error: {exc}", file=sys.stderr)
            print("Try 'fedinfer simulate --help' or check conf/.", file=sys.stderr)
            status["code"] = 2
            return None

    saved_argv = sys.argv
    sys.argv = ["fedinfer simulate", *args]
    try:
        _main()
    except SystemExit as exc:  # Hydra exits on its own errors (bad override ...)
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    finally:
        sys.argv = saved_argv
    return status["code"]
