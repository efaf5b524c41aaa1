"""The SuperNode launcher: Flower's own main with its idle sleep shortened (patch points pinned)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedinfer.deploy import supernode
from fedinfer.deploy.flower import supernode_argv
from fedinfer.deploy.site import _check
from fedinfer.errors import ConfigError


def test_flower_1_42_still_sleeps_3_s_after_an_empty_poll_and_only_there() -> None:
    """The patch point: if an upgrade moves or changes this sleep, this fails, not a deployment."""
    import flwr.supernode.start_client_internal as loop

    source = inspect.getsource(loop.start_client_internal)
    assert source.count(f"time.sleep({supernode.FLOWER_IDLE_SLEEP_S})") == 1
    assert "if run_id is None:" in source.split(f"time.sleep({supernode.FLOWER_IDLE_SLEEP_S})")[0]
    other = inspect.getsource(loop).replace(source, "")
    assert f"time.sleep({supernode.FLOWER_IDLE_SLEEP_S})" not in other
    assert loop.time is time
    # The reply checks: both in _push_messages, on the SuperNode's own state.
    push = inspect.getsource(loop._push_messages)
    assert push.count(f"time.sleep({supernode.FLOWER_REPLY_SLEEP_S})") == 2
    assert other.count(f"time.sleep({supernode.FLOWER_REPLY_SLEEP_S})") == 2
    assert "state.get_messages_legacy(is_reply=True)" in push
    assert inspect.getsource(loop).count("time.sleep(") == 3


def test_the_patch_shortens_that_sleep_and_no_other(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supernode.start_client_internal as loop

    # Prepare
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    # Execute
    patched = supernode.patch_idle_sleep(0.25)
    patched.time.sleep(3)
    patched.time.sleep(0.5)  # a look for the reply in its own state
    patched.time.sleep(1.0)  # anything else: untouched
    # Assert
    assert slept == [0.25, supernode.REPLY_POLL_S, 1.0]
    assert patched.time.monotonic is time.monotonic


def test_a_moved_patch_point_is_refused_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supernode.start_client_internal as loop

    monkeypatch.setattr(loop, "time", object())
    with pytest.raises(RuntimeError, match="no longer uses the `time` module"):
        supernode.patch_idle_sleep(0.25)


def test_the_launcher_runs_flowers_supernode_with_its_own_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedinfer.deploy.supernode", "--idle-poll-s", "0.5", "--", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--superexec-auth-secret-file" in done.stdout and "--isolation" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fedinfer.deploy.supernode", "--idle-poll-s", "0", "--", "--help"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--idle-poll-s" in bad.stderr


def test_the_site_starts_the_launcher_unless_asked_for_flowers_own_wait(tmp_path: Path) -> None:
    common = {
        "superlink": "h:1",
        "ca_cert": tmp_path / "ca",
        "node_key": tmp_path / "k",
        "node_config": tmp_path / "n",
        "runtime_port": 5,
        "runtime_secret": tmp_path / "s",
    }
    patched = supernode_argv(**common, idle_poll_s=0.5)
    assert patched[1:6] == ["-m", "fedinfer.deploy.supernode", "--idle-poll-s", "0.5", "--"]
    assert patched[6:] == supernode_argv(**common)[1:]
    assert supernode_argv(**common)[0].endswith("flower-supernode")


@pytest.mark.parametrize("value", [0.0, -1.0, 3.5], ids=["zero", "negative", "above-flower"])
def test_site_refuses_an_idle_poll_out_of_range(tmp_path: Path, value: float) -> None:
    from tests.test_deploy_app import _site

    options = _site(tmp_path, supernode_idle_poll_s=value)
    with pytest.raises(ConfigError, match="--supernode-idle-poll-s"):
        _check(options)
