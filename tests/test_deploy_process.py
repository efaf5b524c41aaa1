"""Launcher children: logs, clean stop of a whole process group, death with a killed launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedinfer.deploy.process import ManagedProcess, wait_until
from fedinfer.errors import FedInferError


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] == "Z"


def test_stop_ends_the_child_and_what_it_started(tmp_path: Path) -> None:
    # Prepare: a child that starts a grandchild in its own process group
    script = (
        "import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    child = ManagedProcess(
        "child", [sys.executable, "-c", script], log_file=tmp_path / "child.log"
    ).start()
    wait_until(
        lambda: child.log_file.read_text().strip().splitlines()[-1].isdigit(),
        timeout_s=30,
        what="pid",
    )
    grandchild = int(child.log_file.read_text().strip().splitlines()[-1])
    # Execute
    code = child.stop(timeout_s=10)
    # Assert
    assert code == -signal.SIGTERM
    wait_until(lambda: _gone(grandchild), timeout_s=10, what="the grandchild to exit")


def test_children_die_with_a_killed_launcher(tmp_path: Path) -> None:
    # Prepare: a launcher (like `fedinfer site`) holding a child
    log = tmp_path / "sleep.log"
    launcher_code = (
        "import time; from pathlib import Path; "
        "from fedinfer.deploy.process import ManagedProcess; "
        f"p = ManagedProcess('sleep', ['sleep', '60'], log_file=Path({str(log)!r})).start(); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", launcher_code], stdout=subprocess.PIPE, text=True
    )
    assert launcher.stdout is not None
    with launcher.stdout:
        child = int(launcher.stdout.readline())
    # Execute
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    # Assert
    wait_until(lambda: _gone(child), timeout_s=10, what="the orphaned child to get SIGTERM")


def test_a_dead_child_is_reported_with_its_log(tmp_path: Path) -> None:
    child = ManagedProcess(
        "failing",
        [sys.executable, "-c", "import sys; print('bad key'); sys.exit(3)"],
        log_file=tmp_path / "f.log",
    ).start()
    assert child.process is not None
    child.process.wait(timeout=30)
    with pytest.raises(FedInferError, match=r"failing exited with code 3: .*bad key"):
        child.check_alive()


def test_the_log_keeps_earlier_starts(tmp_path: Path) -> None:
    proc = ManagedProcess("echo", ["echo", "hello"], log_file=tmp_path / "echo.log")
    for _ in range(2):
        proc.start()
        assert proc.process is not None
        proc.process.wait(timeout=30)
        time.sleep(0.05)
    lines = proc.log_file.read_text().splitlines()
    assert lines.count("hello") == 2 and sum(line.startswith("=== ") for line in lines) == 2
