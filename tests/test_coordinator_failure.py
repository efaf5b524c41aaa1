"""``fedinfer coordinator`` says why its ServerApp failed, from Flower's own run log.

Real processes: the coordinator CLI, Flower's SuperLink and ServerApp. No site is started,
so the ServerApp gives up after ``deployment.connect_timeout_s`` and raises.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedinfer.deploy.coordinator import serverapp_exception
from fedinfer.deploy.local import LocalDeployment

pytestmark = pytest.mark.timeout(300)

_LOG = (
    "\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process\n"
    "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\n"
    "Traceback (most recent call last):\n"
    '  File "x.py", line 1, in main\n'
    "    raise ValueError(\n"
    "ValueError: first\n"
    "Traceback (most recent call last):\n"
    '  File "apps.py", line 137, in wait_for_sites\n'
    "fedinfer.errors.FedInferError: only 0 site(s) connected\n"
    "\x1b[91mERROR \x1b[0m:     Exit Code: 201\n"
)


def test_the_exception_line_of_the_last_traceback_is_found() -> None:
    assert serverapp_exception(_LOG) == "fedinfer.errors.FedInferError: only 0 site(s) connected"
    assert serverapp_exception("INFO: all good\n") is None


def test_a_failed_federation_prints_the_serverapps_exception(tmp_path: Path) -> None:
    deployment = LocalDeployment(
        tmp_path / "d", num_sites=3, rounds=1, overrides=["model=logreg", "dataset.num_samples=600"]
    )
    overrides = deployment.prepare()
    try:
        coordinator = deployment.start_coordinator([*overrides, "deployment.connect_timeout_s=1"])
        assert coordinator.process is not None
        assert coordinator.process.wait(timeout=240) == 1
    finally:
        deployment.stop()
    out = (tmp_path / "d" / "logs" / "coordinator.log").read_text()
    assert (
        "the ServerApp stopped: only 0 site(s) connected within "
        "`deployment.connect_timeout_s`=1s" in out
    )
    assert "federation failed; no results were written" in out
    saved = deployment.coordinator_dir / "logs" / "serverapp.log"
    assert "Traceback" in saved.read_text() and "\x1b[" not in saved.read_text()
