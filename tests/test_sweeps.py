"""Sweeps and reports: a real `fedinfer simulate -m` multirun, `fedinfer report` on it, sweeps."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hypothesis import given
from hypothesis import strategies as st

from fedinfer.cli import main as fedinfer_main
from fedinfer.config.store import conf_dir, register_configs
from fedinfer.errors import ConfigError, DataError
from fedinfer.reporting.report import REPORT_CSV, SEEDS_CSV, write_report
from fedinfer.reporting.sweep import load_sweep
from fedinfer.reporting.sweep_plots import (
    ACCURACY_PLOT,
    PRIVACY_UTILITY_PLOT,
    SEEDS_PLOT,
    pareto_frontier,
)
from fedinfer.simulation.sweeps import (
    available_sweeps,
    job_cpu_share,
    resolve_sweep,
    sweep_arguments,
    sweeps_dir,
)

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP = (  # 2 jobs: a tiny DP federation, and one that fails on a bad value
    "simulation.runtime=inprocess",
    "serving.enabled=false",
    "secagg=off",
    "simulation.progress=false",
    "dataset.num_samples=600",
    "federation.num_sites=2",
    "federation.rounds=2",
    "federation.local_epochs=1",
    "model=logreg",
    "partition.alpha=0.5,-1",
)


# ------------------------------------------------------------------ the real multirun
@pytest.fixture(scope="module")
def sweep_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Run `fedinfer simulate -m ...` as a user would, in a process of its own (+ MLflow)."""
    root = tmp_path_factory.mktemp("sweep")
    tracking = (
        ["tracking.mlflow=true", f"tracking.uri=file:{root / 'mlruns'}"] if HAS_MLFLOW else []
    )
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}  # MLflow 3 wants a database unless told
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedinfer.cli",
            "simulate",
            "-m",
            *SWEEP,
            *tracking,
            f"hydra.sweep.dir={root / 'multirun'}",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return root / "multirun", completed


@pytest.fixture(scope="module")
def sweep_dir(sweep_run: tuple[Path, subprocess.CompletedProcess[str]]) -> Path:
    return sweep_run[0]


def test_multirun_ends_with_a_tally_and_fails_when_a_job_failed(
    sweep_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    """Each job says where it wrote and what it reached; the sweep tallies its jobs, exit 1."""
    sweep_dir, completed = sweep_run
    results = json.loads((sweep_dir / "0" / "results.json").read_text())
    lines = completed.stdout.splitlines()
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert f"Output directory: {(sweep_dir / '0').resolve()}" in lines
    assert (
        f"Run completed: 2 rounds, final accuracy {results['final_accuracy']:.4f}, "
        f"max epsilon {results['max_epsilon']:.3f}"
    ) in lines
    assert "Site servers: not started (serving.enabled=false)." in lines
    tally = lines[lines.index(f"Sweep: 2 jobs: 1 completed, 1 failed -> {sweep_dir.resolve()}") :]
    assert tally[1].startswith("  job 1 failed: ConfigError: `partition.alpha` must be > 0")
    assert tally[2:] == [f"Summarize it: fedinfer report {sweep_dir.resolve()}"]


def test_multirun_writes_results_json_per_job(sweep_dir: Path) -> None:
    """Each job has its own sub-directory with results.json; the failed one says why."""
    # Execute
    results = {
        d.name: json.loads((d / "results.json").read_text())
        for d in sweep_dir.iterdir()
        if d.is_dir()
    }
    # Assert
    assert sorted(results) == ["0", "1"]
    assert results["0"]["status"] == "completed" and len(results["0"]["rounds"]) == 2
    assert results["1"]["status"] == "failed" and "partition.alpha" in results["1"]["error"]


def test_report_table_has_one_row_per_job_and_shows_the_failure(
    sweep_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedinfer report` writes report.csv: swept key, outcomes, and the failed job as failed."""
    # Execute
    code = fedinfer_main(["report", str(sweep_dir), "--target", "0.05"])
    table = pd.read_csv(sweep_dir / REPORT_CSV)
    # Assert
    assert code == 0
    assert list(table.columns) == [
        "job",
        "partition.alpha",
        "status",
        "rounds",
        "final_accuracy",
        "best_accuracy",
        "rounds_to_0.05",
        "max_epsilon",
        "elapsed_s",
        "error",
    ]
    done, failed = table.iloc[0], table.iloc[1]
    assert (done["partition.alpha"], done["status"], done["rounds"]) == (0.5, "completed", 2)
    assert 0 <= done["final_accuracy"] <= done["best_accuracy"] <= 1
    assert done["max_epsilon"] > 0 and done["elapsed_s"] > 0
    assert done["rounds_to_0.05"] in (1, 2)
    assert (failed["partition.alpha"], failed["status"], failed["rounds"]) == (-1, "failed", 0)
    assert pd.isna(failed["final_accuracy"]) and "must be > 0" in failed["error"]
    terminal = capsys.readouterr().out
    assert "1 completed, 1 failed" in terminal and "partition.alpha" in terminal


def test_report_draws_the_plots(sweep_dir: Path) -> None:
    """Accuracy per round and the privacy-utility plot are PNG files in the sweep directory."""
    # Execute
    report = write_report(sweep_dir)
    # Assert
    for name in (ACCURACY_PLOT, PRIVACY_UTILITY_PLOT):
        assert (sweep_dir / name).read_bytes()[:8] == PNG_MAGIC
        assert sweep_dir / name in report.files
    assert not (sweep_dir / SEEDS_PLOT).exists()  # seed is not swept here


@pytest.mark.skipif(not HAS_MLFLOW, reason="MLflow is an optional extra (fedinfer[tracking])")
def test_tracking_logs_every_round_config_and_artifacts(
    sweep_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tracking.mlflow=true the completed job's rounds, config and results reach MLflow."""
    import mlflow

    # Prepare
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=f"file:{sweep_dir.parent / 'mlruns'}")
    # Execute
    experiment = client.get_experiment_by_name("fedinfer")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    # Assert
    assert len(runs) == 1  # the failed job failed before its federation started
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["fedinfer.status"] == "completed"
    assert run.data.params["partition.alpha"] == "0.5" and run.data.params["model.name"] == "logreg"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [1, 2]
    assert "max_epsilon" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "results.json"} <= artifacts


# ------------------------------------------------------------------ reports of crafted sweeps
def _job(root: Path, name: str, overrides: list[str], results: dict[str, object] | None) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))


def _results(accuracies: list[float], epsilons: list[float]) -> dict[str, object]:
    rounds = [
        {"round": i + 1, "accuracy": a, "epsilon": {"site-00": e}}
        for i, (a, e) in enumerate(zip(accuracies, epsilons, strict=True))
    ]
    return {
        "status": "completed",
        "rounds": rounds,
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "max_epsilon": max(epsilons),
        "elapsed_s": 1.0,
    }


@pytest.fixture
def seeds_sweep(tmp_path: Path) -> Path:
    """2 noise levels x 2 seeds, plus a job killed before it wrote anything."""
    _job(
        tmp_path, "0", ["privacy.noise_multiplier=0.5", "seed=1"], _results([0.5, 0.7], [2.0, 4.0])
    )
    _job(
        tmp_path, "1", ["privacy.noise_multiplier=0.5", "seed=2"], _results([0.6, 0.9], [2.0, 4.0])
    )
    _job(
        tmp_path, "2", ["privacy.noise_multiplier=2.0", "seed=1"], _results([0.3, 0.4], [0.5, 1.0])
    )
    _job(
        tmp_path, "3", ["privacy.noise_multiplier=2.0", "seed=2"], _results([0.3, 0.6], [0.5, 1.0])
    )
    _job(tmp_path, "10", ["privacy.noise_multiplier=4.0", "seed=1"], None)
    return tmp_path


def test_seed_summary_groups_by_every_swept_key_but_seed(seeds_sweep: Path) -> None:
    """Mean and spread over seeds per noise level; the killed job counts as failed, not as data."""
    # Execute
    report = write_report(seeds_sweep, target=0.65)
    seeds = pd.read_csv(seeds_sweep / SEEDS_CSV)
    # Assert
    assert list(report.table["job"]) == ["0", "1", "2", "3", "10"]
    assert list(report.table["status"]) == ["completed"] * 4 + ["missing"]
    assert list(report.table["rounds_to_0.65"].astype("object").fillna(-1)) == [2, 2, -1, -1, -1]
    assert list(seeds["privacy.noise_multiplier"]) == [0.5, 2.0, 4.0]
    assert list(seeds["seeds"]) == [2, 2, 0] and list(seeds["failed"]) == [0, 0, 1]
    assert seeds["final_accuracy_mean"].iloc[0] == pytest.approx(0.8)
    assert seeds["final_accuracy_std"].iloc[0] == pytest.approx(0.1)
    assert (seeds_sweep / SEEDS_PLOT).read_bytes()[:8] == PNG_MAGIC


def test_report_of_a_directory_without_jobs_names_the_fix(tmp_path: Path) -> None:
    """A wrong directory is a user mistake: exit code 2 and a message, no traceback."""
    # Execute / Assert
    with pytest.raises(DataError, match="no Hydra job found"):
        load_sweep(tmp_path)
    assert fedinfer_main(["report", str(tmp_path / "nope")]) == 2


@given(st.lists(st.tuples(st.floats(0.01, 100), st.floats(0, 1)), min_size=1, max_size=30))
def test_pareto_frontier_is_exactly_the_undominated_points(
    points: list[tuple[float, float]],
) -> None:
    """Every point is matched or beaten by a frontier point; no frontier point is beaten."""
    # Execute
    frontier = pareto_frontier(points)
    # Assert
    for eps, acc in points:
        assert any(f_eps <= eps and f_acc >= acc for f_eps, f_acc in frontier)
    for f_eps, f_acc in frontier:
        assert not any(eps <= f_eps and acc > f_acc for eps, acc in points)


# ------------------------------------------------------------------ ready-made sweeps
@pytest.mark.parametrize("name", ["privacy_utility", "noniid", "strategies", "tune_dp"])
def test_ready_made_sweeps_compose_onto_conf(name: str) -> None:
    """Each sweep in simulations/ extends conf/config.yaml and sweeps something."""
    # Prepare
    if name == "tune_dp" and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        pytest.skip("the Optuna sweeper is an optional extra (fedinfer[optuna])")
    register_configs()
    # Execute
    with initialize_config_dir(config_dir=str(sweeps_dir()), version_base=None):
        cfg = compose(
            config_name=name,
            overrides=[f"hydra.searchpath=[file://{conf_dir()}]"],
            return_hydra_config=True,
        )
    # Assert
    assert cfg.hydra.sweeper.params and cfg.serving.enabled is False and cfg.secagg.enabled is False
    assert cfg.dataset.name == "mnist1d" and cfg.federation.num_sites == 10


def test_unknown_sweep_lists_the_known_ones() -> None:
    """The error names every ready-made sweep."""
    # Execute / Assert
    with pytest.raises(ConfigError, match="privacy_utility") as error:
        resolve_sweep("no_such_sweep")
    assert set(available_sweeps()) >= {"privacy_utility", "noniid", "strategies", "tune_dp"}
    assert "noniid" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "expected_head", "expected_tail"),
    [
        (["seed=1,2"], ["--multirun"], ["hydra.sweep.dir=out", "seed=1,2"]),
        (
            ["seed=1", "--cfg", "job"],
            ["--config-dir"],
            ["--cfg", "job", "hydra.sweep.dir=out", "seed=1"],
        ),
        (["hydra.sweep.dir=mine"], ["--multirun"], ["noniid", "hydra.sweep.dir=mine"]),
    ],
    ids=["overrides-follow", "flags-before-overrides-no-multirun", "user-sweep-dir-wins"],
)
def test_sweep_arguments(
    overrides: list[str], expected_head: list[str], expected_tail: list[str]
) -> None:
    # Execute
    args = sweep_arguments(Path("simulations/noniid.yaml"), overrides, sweep_dir=Path("out"))
    # Assert
    assert args[: len(expected_head)] == expected_head
    assert args[-len(expected_tail) :] == expected_tail


@pytest.mark.parametrize(
    ("n_jobs", "cores", "client_cpus", "share"),
    [
        (1, 16, 1.0, 16),
        (2, 16, 1.0, 8),
        (3, 16, 2.0, 5),
        (-1, 4, 1.0, 1),
        (-2, 4, 1.0, 1),
        (2, 2, 1.0, 1),
    ],
    ids=["sequential", "halves", "rounds-down", "joblib-all-cores", "joblib-all-but-one", "tight"],
)
def test_parallel_jobs_share_the_cpus(
    n_jobs: int, cores: int, client_cpus: float, share: int
) -> None:
    assert job_cpu_share(n_jobs=n_jobs, cores=cores, client_cpus=client_cpus) == share


def test_parallel_jobs_that_cannot_fit_are_refused() -> None:
    """n_jobs * client_cpus > cores would oversubscribe: the error names the key and the fix."""
    with pytest.raises(ConfigError, match=r"hydra\.launcher\.n_jobs.*<= 4"):
        job_cpu_share(n_jobs=5, cores=8, client_cpus=2.0)


def test_fedinfer_sweep_with_a_failed_job_still_reports_and_exits_1(tmp_path: Path) -> None:
    """`fedinfer sweep`: the tally, then the report (which shows the failure), then exit 1."""
    # Execute: the noniid sweep cut to 2 tiny jobs, the second on a bad value
    sweep = tmp_path / "noniid"
    completed = subprocess.run(
        [
            sys.executable, "-m", "fedinfer.cli", "sweep", "noniid",
            "simulation.runtime=inprocess", "simulation.progress=false",
            "dataset.num_samples=600", "federation.num_sites=2", "federation.rounds=1",
            "model=logreg", "partition.alpha=0.5,-1", "seed=1", f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    # Assert
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert f"Sweep: 2 jobs: 1 completed, 1 failed -> {sweep.resolve()}" in completed.stdout
    table = pd.read_csv(sweep / REPORT_CSV)
    assert table["status"].tolist() == ["completed", "failed"]
