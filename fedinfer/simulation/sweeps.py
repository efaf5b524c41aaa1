"""Ready-made sweeps by name, and each job's share of the CPUs in a parallel sweep.

A sweep is a Hydra config in ``simulations/`` that extends ``conf/config.yaml``
(``defaults: [config, _self_]``) and sets ``hydra.sweeper.params``.
``fedinfer sweep NAME`` composes it with ``--config-dir simulations
--config-name NAME --multirun``, so every Hydra override still applies.

Parallel sweeps use Hydra's joblib launcher (``--jobs N``, or
``hydra/launcher=joblib hydra.launcher.n_jobs=N``). Flower's simulation wants
CPUs too: each job gets ``cores // n_jobs`` of them (torch threads and the
job's Ray instance), which needs ``n_jobs * federation.client_cpus <= cores``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedinfer.errors import ConfigError

__all__ = [
    "SWEEPS_ENV",
    "available_sweeps",
    "available_cpus",
    "explicit_sweep_dir",
    "inspects_only",
    "job_cpu_share",
    "launcher_jobs",
    "scheduled_launcher",
    "resolve_sweep",
    "split_hydra_args",
    "sweep_arguments",
    "sweep_description",
    "sweeps_dir",
]

SWEEPS_ENV = "FEDINFER_SWEEPS_DIR"
_INSPECT_FLAGS = frozenset(
    {
        "--cfg",
        "-c",
        "--info",
        "-i",
        "--help",
        "-h",
        "--hydra-help",
        "--shell-completion",
        "-sc",
        "--version",
    }
)
_PLUGINS = {  # a sweep config naming the plugin -> (importable module, what to pip install)
    "hydra/sweeper: optuna": ("hydra_plugins.hydra_optuna_sweeper", "'fedinfer[optuna]'"),
    "hydra/launcher: joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
}


def sweeps_dir() -> Path:
    """Where ready-made sweeps live: ``$FEDINFER_SWEEPS_DIR``, else the repo's ``simulations/``."""
    env = os.environ.get(SWEEPS_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "simulations"


def available_sweeps(directory: Path | None = None) -> dict[str, Path]:
    """Ready-made sweeps, name -> YAML file (every ``*.yaml`` in :func:`sweeps_dir`)."""
    directory = directory or sweeps_dir()
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))} if directory.is_dir() else {}


def sweep_description(path: Path) -> str:
    """The first comment line of a sweep config: what the sweep studies."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_sweep(name: str) -> Path:
    """The config file of sweep ``name`` (a ready-made sweep's name, or a path to a YAML file).

    Raises :class:`~fedinfer.errors.ConfigError` listing the available sweeps when
    ``name`` is neither, or when the sweep needs a Hydra plugin that is not installed.
    """
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _check_plugins(path.resolve())
    sweeps = available_sweeps()
    if name not in sweeps:
        known = ", ".join(sweeps) or f"none (no *.yaml in {sweeps_dir()})"
        raise ConfigError(
            f"no sweep named {name!r}; choose one of {known}, or pass a path to a sweep YAML "
            f"(set ${SWEEPS_ENV} to use another directory)"
        )
    return _check_plugins(sweeps[name])


def _check_plugins(path: Path) -> Path:
    text = path.read_text()
    for marker, (module, package) in _PLUGINS.items():
        if marker in text and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"sweep {path.stem!r} uses a Hydra plugin ({module}) that is not installed; "
                f"install it with `pip install {package}`"
            )
    return path


def sweep_arguments(
    sweep: Path, overrides: Sequence[str], *, sweep_dir: Path, jobs: int | None = None
) -> list[str]:
    """The ``fedinfer simulate`` arguments that run ``sweep`` with ``overrides``.

    ``sweep_dir`` is used unless ``overrides`` set ``hydra.sweep.dir`` themselves;
    ``jobs`` > 1 runs that many jobs at once with Hydra's joblib launcher.

    Examples
    --------
    >>> sweep_arguments(Path("simulations/noniid.yaml"), ["seed=1,2"], sweep_dir=Path("out"))[-2:]
    ['hydra.sweep.dir=out', 'seed=1,2']
    """
    flags, overrides = split_hydra_args(overrides)
    mode = [] if inspects_only(flags) else ["--multirun"]
    args = [*mode, "--config-dir", str(sweep.parent), "--config-name", sweep.stem, *flags]
    if jobs is not None and jobs != 1:
        if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None:
            raise ConfigError(
                "`--jobs` needs Hydra's joblib launcher; install it with "
                "`pip install hydra-joblib-launcher`"
            )
        args += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    if explicit_sweep_dir(overrides) is None:
        args.append(f"hydra.sweep.dir={sweep_dir}")
    return [*args, *overrides]


def split_hydra_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split command-line words into Hydra flags (with their values) and overrides.

    Hydra takes its flags (``--cfg job``, ``--info``) before the overrides, never between them.

    Examples
    --------
    >>> split_hydra_args(["seed=1,2", "--cfg", "job", "~faults"])
    (['--cfg', 'job'], ['seed=1,2', '~faults'])
    """
    is_override = [("=" in a or a.startswith("~")) and not a.startswith("-") for a in args]
    flags = [a for a, o in zip(args, is_override, strict=True) if not o]
    return flags, [a for a, o in zip(args, is_override, strict=True) if o]


def inspects_only(flags: Sequence[str]) -> bool:
    """Whether Hydra flags ask to show something (``--cfg``, ``--info``, ``--help``), not to run."""
    return any(f.split("=")[0] in _INSPECT_FLAGS for f in flags)


def explicit_sweep_dir(overrides: Sequence[str]) -> str | None:
    """The value of a ``hydra.sweep.dir=...`` override, if one is given."""
    for override in overrides:
        match = re.fullmatch(r"\+*hydra\.sweep\.dir=(.+)", override)
        if match:
            return match.group(1)
    return None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def job_cpu_share(*, n_jobs: int, cores: int, client_cpus: float) -> int:
    """CPUs one job of a parallel sweep may use so that the jobs together fit on ``cores``.

    ``n_jobs`` follows joblib: -1 means one job per core, -2 all cores but one.

    Examples
    --------
    >>> job_cpu_share(n_jobs=2, cores=16, client_cpus=1.0)
    8
    >>> job_cpu_share(n_jobs=-1, cores=4, client_cpus=1.0)
    1
    """
    effective = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    if effective * client_cpus > cores:
        fit = max(1, int(cores // client_cpus))
        raise ConfigError(
            f"`hydra.launcher.n_jobs` ({n_jobs}) x `federation.client_cpus` ({client_cpus}) "
            f"needs more than the {cores} CPUs available; set hydra.launcher.n_jobs <= {fit} "
            f"(or --jobs {fit}), "
            "or lower federation.client_cpus"
        )
    return max(1, cores // effective)


def launcher_jobs(launcher: Mapping[str, object]) -> int | None:
    """How many jobs a Hydra launcher config runs at once (None: the sequential basic launcher)."""
    n_jobs = launcher.get("n_jobs")
    return int(n_jobs) if isinstance(n_jobs, int) else None


def scheduled_launcher(launcher: Mapping[str, object]) -> bool:
    """Whether a Hydra launcher hands each job to a scheduler that grants its share.

    submitit's Slurm and local executors and Hydra's Ray launcher ask for
    ``simulation.job_cpus`` CPUs per job (``conf/hydra/launcher/*.yaml``).
    """
    target = str(launcher.get("_target_", ""))
    return "hydra_submitit_launcher" in target or "hydra_ray_launcher" in target
