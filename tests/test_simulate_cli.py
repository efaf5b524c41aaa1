"""`fedinfer simulate` as a user runs it: what its last lines say, and what its log holds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

TINY_SERVED = (  # 2 sites, DP, every site serves at the end: about 12 s a run
    "simulation.runtime=inprocess",
    "secagg=off",
    "dataset.num_samples=600",
    "federation.num_sites=2",
    "federation.rounds=2",
    "federation.local_epochs=1",
    "model=logreg",
    "serving.backend=torch",
)


def _ready(url: str) -> int:
    return httpx.get(f"{url}/v2/health/ready", timeout=10, trust_env=False).status_code


def _simulate(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedinfer.cli", "simulate", *args]


def test_simulate_ends_with_output_dir_accuracy_epsilon_and_stopped_servers(
    tmp_path: Path,
) -> None:
    """The summary names the output directory and the run's numbers; no dead endpoints."""
    # Execute
    out = tmp_path / "run"
    proc = subprocess.run(
        _simulate(*TINY_SERVED, f"hydra.run.dir={out}"),
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = json.loads((out / "results.json").read_text())
    # Assert: the last three lines, with the numbers of results.json
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-3:] == [
        f"Output directory: {out}",
        f"Run completed: 2 rounds, final accuracy {results['final_accuracy']:.4f}, "
        f"max epsilon {results['max_epsilon']:.3f}",
        "Site servers stopped (serving.keep_alive=true keeps them).",
    ]
    assert "http://" not in proc.stdout, "no endpoint of a server that is already gone"
    # Assert: the job's log holds the round table and the summary, the terminal shows them once
    (log,) = out.glob("*.log")
    text = log.read_text()
    assert "ok/refused/failed" in text and "  2/2 " in text
    assert f"Output directory: {out}" in text and "demo requests: site-00" in text
    assert "[fedinfer.run]" not in proc.stdout + proc.stderr


def test_keep_alive_lists_live_urls_until_ctrl_c(tmp_path: Path) -> None:
    """serving.keep_alive=true: the summary lists URLs that answer; Ctrl-C stops them, exit 0."""
    # Prepare
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _simulate(
            *TINY_SERVED, "serving.keep_alive=true", "privacy=none", f"hydra.run.dir={out}"
        ),
        cwd=tmp_path,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Execute: read up to the live URLs
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if len([x for x in lines if "/v2/models/logreg" in x]) == 2:
                break
        urls = [x.split()[-1].split("/v2/")[0] for x in lines if "/v2/models/logreg" in x]
        ready = [_ready(u) for u in urls]
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Assert
    assert "Site servers running (Ctrl-C stops them):" in lines, err[-3000:]
    shown = "\n".join(lines)
    assert "Run completed: 2 rounds" in shown and "max epsilon - (no DP guarantee)" in shown
    assert len(urls) == 2 and ready == [200, 200]
    assert proc.returncode == 0 and rest.splitlines()[-1] == "Site servers stopped."
    for url in urls:
        with pytest.raises(httpx.TransportError):
            _ready(url)
