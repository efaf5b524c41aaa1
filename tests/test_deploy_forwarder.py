"""The per-message ClientApp forwards to the site worker over a Unix socket only the site may use.

Real sockets, real processes: the forwarder module is imported in a fresh interpreter, and the
attacker is a separate process running as another user (when the tests run as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedinfer.deploy.forwarder import (
    SOCKET_NAME,
    WORKER_UNREACHABLE,
    encode_request,
    forward,
)
from fedinfer.deploy.site_worker import SiteWorker, serve_socket
from fedinfer.errors import ConfigError
from fedinfer.fl.messages import ErrorCodes
from fedinfer.fl.run_config import NodeConfigKeys

REPO = Path(__file__).resolve().parents[1]


def _echo_app(calls: list[Context]) -> ClientApp:
    """A ClientApp that doubles the arrays, counts in ``context.state`` and reports its node."""
    app = ClientApp()

    @app.query("echo")
    def echo(msg: Message, context: Context) -> Message:
        calls.append(context)
        count = int(context.state.config_records.get("n", ConfigRecord({"n": 0}))["n"]) + 1
        context.state["n"] = ConfigRecord({"n": count})
        doubled = {
            k: Array(v.numpy() * 2) for k, v in msg.content.array_records["arrays"].items()
        }
        node = ConfigRecord({k: str(v) for k, v in context.node_config.items()})
        content = RecordDict({"arrays": ArrayRecord(doubled), "node": node})
        return Message(content, reply_to=msg)

    return app


def _message(node_id: int = 7) -> Message:
    # A coordinator's instruction, as the ServerApp's process identity makes it.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    msg = Message(RecordDict({"arrays": arrays}), node_id, "query.echo", group_id="1")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperNode sets it
    return msg


def _context(state_dir: Path, *, node_config: dict[str, str] | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config=node_config or {NodeConfigKeys.STATE_DIR: str(state_dir)},
        state=RecordDict(),
        run_config={"x": 1},
    )


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A 0700 state directory below a directory every user may traverse (as /srv/site would be)."""
    parent = Path(tempfile.mkdtemp(prefix="fwd-"))
    parent.chmod(0o711)
    state = parent / "state"
    state.mkdir(mode=0o700)
    yield state
    shutil.rmtree(parent, ignore_errors=True)


def test_the_forwarder_imports_only_flower() -> None:
    """The ClientApp a SuperNode spawns per message loads neither torch, Opacus nor fedinfer.fl."""
    code = (
        "import runpy, sys\n"
        f"app = runpy.run_path({str(REPO / 'clients' / 'app.py')!r})['app']\n"
        "heavy = [m for m in ('torch', 'opacus', 'fedinfer.fl', 'fedinfer.config', 'omegaconf')"
        " if m in sys.modules]\n"
        "print(type(app).__name__, heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.split() == ["ForwardingClientApp", "[]"]


def test_a_message_round_trips_through_the_worker_with_state_and_the_sites_own_node_config(
    state_dir: Path,
) -> None:
    calls: list[Context] = []
    own = {NodeConfigKeys.STATE_DIR: str(state_dir), NodeConfigKeys.SITE_NAME: "site-00"}
    with serve_socket(SiteWorker(_echo_app(calls), node_config=own), state_dir):
        claimed = {
            NodeConfigKeys.STATE_DIR: str(state_dir),
            NodeConfigKeys.DATA_PATH: "/etc/shadow",  # a peer's node config is not believed
        }
        context = _context(state_dir, node_config=claimed)
        msg = _message()
        first = forward(msg, context)
        second = forward(_message(), context)
    assert not first.has_error(), first.error
    np.testing.assert_array_equal(
        first.content.array_records["arrays"]["w"].numpy(),
        np.arange(6, dtype=np.float32).reshape(2, 3) * 2,
    )
    assert first.metadata.reply_to_message_id == msg.metadata.message_id
    assert first.metadata.dst_node_id == msg.metadata.src_node_id
    assert dict(first.content.config_records["node"]) == own
    assert context.state.config_records["n"]["n"] == 2  # Flower's Context.state came back
    assert second.content.config_records["node"] == first.content.config_records["node"]
    assert [c.run_config for c in calls] == [{"x": 1}, {"x": 1}]


def test_the_socket_is_0600_and_an_open_state_dir_is_refused(state_dir: Path) -> None:
    with serve_socket(SiteWorker(_echo_app([]), node_config={}), state_dir):
        mode = stat.S_IMODE((state_dir / SOCKET_NAME).stat().st_mode)
        assert mode == 0o600
    assert not (state_dir / SOCKET_NAME).exists()
    state_dir.chmod(0o755)
    with pytest.raises(ConfigError, match="chmod 700"):
        with serve_socket(SiteWorker(_echo_app([]), node_config={}), state_dir):
            pass


def test_no_worker_is_a_clear_error_reply_not_a_hang(state_dir: Path) -> None:
    reply = forward(_message(), _context(state_dir))
    assert reply.has_error()
    assert reply.error.code == WORKER_UNREACHABLE == ErrorCodes.WORKER_UNREACHABLE
    assert str(state_dir / SOCKET_NAME) in reply.error.reason
    assert "fedinfer site" in reply.error.reason


def test_a_worker_that_dies_mid_message_is_a_clear_error_reply(state_dir: Path) -> None:
    """The worker accepts and then goes away (killed while training): the forwarder answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(state_dir / SOCKET_NAME))
        server.listen(1)

        def accept_and_drop() -> None:
            conn, _ = server.accept()
            conn.recv(16)
            conn.close()

        thread = threading.Thread(target=accept_and_drop)
        thread.start()
        reply = forward(_message(), _context(state_dir))
        thread.join()
    assert reply.has_error() and reply.error.code == WORKER_UNREACHABLE
    assert "not reachable" in reply.error.reason  # reset or closed early, by timing


def test_a_long_state_dir_still_gets_a_socket(tmp_path: Path) -> None:
    """Unix socket paths are capped at 108 bytes; a deep state directory must still work."""
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "state"
    deep.mkdir(parents=True, mode=0o700)
    with serve_socket(SiteWorker(_echo_app([]), node_config={}), deep):
        reply = forward(_message(), _context(deep))
    assert not reply.has_error(), reply.error


def test_a_peer_of_another_uid_is_refused_by_the_worker(state_dir: Path) -> None:
    """Even with the socket reachable, a peer whose uid is not the site's is not served."""
    calls: list[Context] = []
    worker = SiteWorker(_echo_app(calls), node_config={})
    with serve_socket(worker, state_dir, allowed_uid=os.getuid() + 1):
        reply = forward(_message(), _context(state_dir))
    assert reply.has_error() and reply.error.code == WORKER_UNREACHABLE
    assert calls == []


ATTACKER = """
import socket, sys
frames = open(sys.argv[2], 'rb').read()
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
    sock.sendall(frames)
    print('REPLY' if sock.recv(1 << 16) else 'CLOSED')
except OSError as exc:
    print('DENIED', exc.errno)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
@pytest.mark.parametrize("loose", [False, True], ids=["as-deployed", "perms-loosened"])
def test_another_local_user_cannot_submit_a_message(
    state_dir: Path, loose: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: user ``nobody`` connects to the site's socket and sends a well-formed message.

    As deployed the socket's permissions stop it; with the directory and socket opened up to
    everyone (an operator's mistake) the worker's peer-uid check still does.
    """
    calls: list[Context] = []
    frames = state_dir.parent / "frames.bin"
    payload = b"".join(
        len(f).to_bytes(8, "big") + f for f in encode_request(_message(), _context(state_dir))
    )
    frames.write_bytes(payload)
    frames.chmod(0o644)
    with serve_socket(SiteWorker(_echo_app(calls), node_config={}), state_dir):
        if loose:
            state_dir.chmod(0o755)
            (state_dir / SOCKET_NAME).chmod(0o777)
        attack = subprocess.run(
            ["/usr/bin/python3", "-c", ATTACKER, str(state_dir / SOCKET_NAME), str(frames)],
            user=65534,
            group=65534,
            capture_output=True,
            text=True,
            check=True,
            env={},
        )
        honest = forward(_message(), _context(state_dir))  # the site's own user still is served
    assert "REPLY" not in attack.stdout
    if loose:  # connected, then dropped unread (EPIPE / reset / closed, by timing)
        assert "refused a ClientApp connection from uid 65534" in caplog.text
    else:
        assert attack.stdout.split() == ["DENIED", "13"]  # EACCES: the 0700 directory, 0600 socket
    assert len(calls) == 1 and not honest.has_error()  # only the site's own message ran


def test_the_worker_process_serves_until_sigterm_and_logs_each_message(state_dir: Path) -> None:
    """``python -m fedinfer.deploy.site_worker`` as ``fedinfer site`` starts it, really killed."""
    node_config = state_dir / "node-config.toml"
    node_config.write_text(f'"{NodeConfigKeys.STATE_DIR}" = "{state_dir}"\n')
    argv = [sys.executable, "-m", "fedinfer.deploy.site_worker", "--state-dir", str(state_dir)]
    worker = subprocess.Popen(
        [*argv, "--node-config", str(node_config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not (state_dir / SOCKET_NAME).exists():
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            threading.Event().wait(0.1)
        reply = forward(_message(), _context(state_dir))  # no handler for query.echo there
        worker.send_signal(15)
        _, log = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert reply.has_error() and reply.error.code == 2  # Flower's "ClientApp raised"
    assert "No query function registered with name 'echo'" in reply.error.reason
    assert "query.echo message" in log
    assert worker.returncode == 0 and not (state_dir / SOCKET_NAME).exists()


def test_a_malformed_request_is_dropped_and_the_worker_keeps_serving(state_dir: Path) -> None:
    calls: list[Context] = []
    with serve_socket(SiteWorker(_echo_app(calls), node_config={}), state_dir):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(state_dir / SOCKET_NAME))
            garbage = [b"fedinfer-clientapp/1", b"\xff" * 32, b"not a protobuf"]
            sock.sendall(b"".join(len(f).to_bytes(8, "big") + f for f in garbage))
            assert sock.recv(1 << 16) == b""  # closed without an answer
        reply = forward(_message(), _context(state_dir))
    assert not reply.has_error() and len(calls) == 1
