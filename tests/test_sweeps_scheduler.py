"""Sweeps on a scheduler: the Slurm launcher config, run through submitit's local executor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher", reason="pip install 'fedinfer[cluster]'"
)


def _simulate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedinfer.cli", "simulate", *args],
        cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )


def test_slurm_local_runs_each_job_as_a_scheduled_process_with_its_cpu_share(
    tmp_path: Path,
) -> None:
    """hydra/launcher=slurm_local: two jobs, each submitted by submitit with cpus_per_task
    = simulation.job_cpus, and each job's run capped to exactly that share."""
    sweep = tmp_path / "sweep"
    proc = _simulate(
        "-m", "hydra/launcher=slurm_local", *TINY, "privacy=none", "secagg=off",
        "federation.rounds=1", "simulation.job_cpus=1", "seed=1,2",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["status"] == "completed"
        assert results["config"]["simulation"]["num_cpus"] == 1, "the job kept to its share"
    submitted = list((sweep / ".submitit").rglob("*_submitted.pkl"))
    assert len(submitted) == 2, "submitit ran each job as its own submission"
    hydra_cfg = (sweep / "0" / ".hydra" / "hydra.yaml").read_text()
    assert "cpus_per_task: ${simulation.job_cpus}" in hydra_cfg, "the share comes from the job"
    assert "hydra_submitit_launcher" in hydra_cfg


def test_a_job_share_smaller_than_a_site_is_a_config_error(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = _simulate(
        "-m", "hydra/launcher=slurm_local", *TINY, "simulation.job_cpus=1",
        "federation.client_cpus=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    results = json.loads((sweep / "0" / "results.json").read_text())
    assert results["status"] == "failed"
    assert "simulation.job_cpus" in results["error"]
    assert "federation.client_cpus" in results["error"]
    assert "Traceback" not in proc.stderr


def test_ray_launcher_runs_jobs_as_ray_tasks_and_refuses_a_nested_ray_runtime(
    tmp_path: Path,
) -> None:
    """hydra/launcher=ray_cluster (pip install --no-deps hydra-ray-launcher): an in-process job
    completes with its share; a job asking for Flower's Ray runtime inside the Ray task (which
    hung) fails at once with an error naming the key."""
    pytest.importorskip(
        "hydra_plugins.hydra_ray_launcher", reason="pip install --no-deps hydra-ray-launcher"
    )
    sweep = tmp_path / "sweep"
    _simulate(
        "-m", "hydra/launcher=ray_cluster", *TINY, "privacy=none", "secagg=off",
        "federation.rounds=1", "simulation.job_cpus=1", "simulation.runtime=inprocess,ray",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    done = json.loads((sweep / "0" / "results.json").read_text())
    assert done["status"] == "completed" and done["config"]["simulation"]["num_cpus"] == 1
    refused = json.loads((sweep / "1" / "results.json").read_text())
    assert refused["status"] == "failed" and "simulation.runtime" in refused["error"]
