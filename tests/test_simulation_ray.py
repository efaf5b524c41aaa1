"""Simulations on a Ray cluster we did not start, and never on a dead one (issue 15 part 2).

A real Ray head runs as a separate process on loopback (``ray start --head --block``, its own
temp dir through ``RAY_TMPDIR`` so the machine's ``/tmp/ray`` is never touched) and is stopped by
killing its process group, never with ``ray stop`` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedinfer.config import load_config
from fedinfer.errors import ConfigError
from fedinfer.simulation import run_simulation
from fedinfer.simulation.ray_backend import backend_config
from tests.conftest import TINY, tiny_config

RAY = str(Path(sys.executable).parent / "ray")
RAY_SIM = ("simulation.runtime=ray", "privacy=none", "secagg=off", "federation.num_sites=3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_head(proc: subprocess.Popen[bytes], cluster_file: Path, port: int) -> None:
    for _ in range(600):  # polled; the 60 s only bounds a broken start
        assert proc.poll() is None, "the Ray head exited during start-up"
        if cluster_file.exists():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
        time.sleep(0.1)
    raise AssertionError("the Ray head did not start")


@contextlib.contextmanager
def ray_head(ray_tmpdir: Path) -> Iterator[str]:
    """A Ray head on loopback in its own process group; yields its GCS address."""
    port = _free_port()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for_head(proc, ray_tmpdir / "ray" / "ray_current_cluster", port)
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the head and every daemon it started
        proc.wait()


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    # Short: Ray's Unix socket paths under the temp dir must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="fi-ray-", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _jobs_on(address: str, ray_tmpdir: Path) -> list[dict]:
    """The driver jobs the head has seen (read from its GCS, in a fresh process)."""
    code = (
        "import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False);"
        "print(json.dumps([{'driver_pid': j['DriverPid'], 'is_dead': j['IsDead']}"
        " for j in ray._private.state.jobs()])); ray.shutdown()" % address
    )
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_simulation_runs_on_an_existing_ray_cluster(
    out_dir: Path, ray_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """simulation.ray_address=host:port: the sites run on that head, not on a private Ray."""
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    with ray_head(ray_tmpdir) as address:
        cfg = tiny_config(*RAY_SIM, f"simulation.ray_address={address}")
        result = run_simulation(cfg, output_dir=out_dir)
        jobs = _jobs_on(address, ray_tmpdir)
    assert result.results["status"] == "completed" and len(result.results["rounds"]) == 2
    assert os.getpid() in [j["driver_pid"] for j in jobs], "this process drove a job on the head"
    assert (out_dir / "site_data" / "index.json").exists(), "the sites mapped the shared data"


def test_a_stale_cluster_file_is_never_joined(out_dir: Path, ray_tmpdir: Path) -> None:
    """A head that was started and then died leaves its cluster file; `simulate` must not hang.

    Before the fix, ``ray.init()`` joined the address in the file and retried for ever,
    printing "Failed to connect to GCS" every 30 s.
    """
    with ray_head(ray_tmpdir):
        pass
    cluster_file = ray_tmpdir / "ray" / "ray_current_cluster"
    assert cluster_file.exists(), "the dead head's cluster file is still there"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir)}
    overrides = [*TINY, *RAY_SIM, "federation.num_sites=2", f"hydra.run.dir={out_dir}"]
    proc = subprocess.run(
        [sys.executable, "-m", "fedinfer.cli", "simulate", *overrides],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out_dir / "results.json").read_text())["status"] == "completed"


def test_auto_without_a_cluster_names_the_key(
    ray_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"simulation\.ray_address.*ray start --head"):
        backend_config(load_config(["simulation.ray_address=auto"]))


def test_auto_with_a_stale_cluster_file_fails_fast(
    ray_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto reads `ray start`'s cluster file; a dead head there is an error, not a retry loop."""
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
    with pytest.raises(ConfigError, match=r"simulation\.ray_address.*no Ray head answers"):
        backend_config(load_config(["simulation.ray_address=auto"]))


def test_a_dead_address_fails_fast_and_names_the_key() -> None:
    cfg = load_config([f"simulation.ray_address=127.0.0.1:{_free_port()}"])
    with pytest.raises(ConfigError, match=r"simulation\.ray_address.*no Ray head answers"):
        backend_config(cfg)


@pytest.mark.parametrize("address", ["localhost", "host:port", "ray://h:0"], ids=str)
def test_a_malformed_address_is_a_config_error(address: str) -> None:
    from fedinfer.config.validate import validate_config

    with pytest.raises(ConfigError, match=r"simulation\.ray_address"):
        validate_config(load_config([f"simulation.ray_address={address}"]))


def test_backend_config_private_by_default_and_gpu_fractions_pass_through() -> None:
    cfg = load_config(["federation.client_gpus=0.25", "federation.client_cpus=0.5",
                       "simulation.num_cpus=2"])
    config = backend_config(cfg)
    assert config["init_args"]["address"] == "local", "never a cluster left by `ray start`"
    assert config["init_args"]["num_cpus"] == 2
    assert config["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.25}


@pytest.mark.gpu
def test_gpu_fractions_reach_the_site_actors(out_dir: Path) -> None:
    """federation.client_gpus=0.5: two sites share one GPU, and the sites train on it."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cfg = tiny_config(*RAY_SIM, "federation.client_gpus=0.5", "simulation.device=cuda")
    assert backend_config(cfg)["client_resources"]["num_gpus"] == 0.5
    result = run_simulation(cfg, output_dir=out_dir)
    assert result.results["status"] == "completed" and len(result.results["rounds"]) == 2


def test_user_code_named_by_the_config_runs_on_an_existing_ray_cluster(
    out_dir: Path, ray_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dataset=function and a state key on a cluster started before the run.

    The head never saw the driver's environment: before the fix every site refused the run's
    own data function (not on its allow-list) and would have kept its state in plaintext.
    """
    from fedinfer.crypto.at_rest import StateKey
    from tests.at_rest_helpers import plaintext_hits

    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    monkeypatch.delenv("FEDINFER_DATA_TARGETS", raising=False)
    monkeypatch.delenv("FEDINFER_STATE_KEY_FILE", raising=False)
    with ray_head(ray_tmpdir) as address:
        key_file = ray_tmpdir / "keys" / "site.key"
        StateKey.generate().save(key_file)
        monkeypatch.setenv("FEDINFER_STATE_KEY_FILE", str(key_file))  # after the head started
        cfg = tiny_config(
            *RAY_SIM, f"simulation.ray_address={address}", "task=regression", "dataset=function",
            "dataset._target_=tests.test_data_lazy_tasks.load_site", "privacy=dpsgd",
        )  # fmt: skip
        result = run_simulation(cfg, output_dir=out_dir)
    assert result.results["status"] == "completed", result.results.get("stop_reason")
    assert len(result.results["rounds"]) == 2
    assert all(not r["failed"] and r["aggregated"] for r in result.results["rounds"])
    ledgers = list((out_dir / "sites").rglob("ledger.json"))
    assert len(ledgers) == 3, "every site kept a privacy ledger"
    assert plaintext_hits(out_dir / "sites") == [], "the sites' state is sealed"
