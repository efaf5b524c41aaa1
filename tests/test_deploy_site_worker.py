"""The site worker's pieces, and the Flower 1.42 internals it drives (pinned: fail loudly if moved).

The worker end to end (a real SuperNode handing it tasks) is tested in
tests/test_deploy_pinned_clientapp.py and tests/test_deploy_e2e.py.
"""

from __future__ import annotations

import inspect
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.fab import Fab
from flwr.supercore.task_identity import TaskIdentity

from fedinfer.deploy import flower_runtime as fr
from fedinfer.deploy.bundle import COMPONENTS, PUBLISHER, write_app_bundle
from fedinfer.deploy.flower import flower_bin
from fedinfer.deploy.supernode import SECRET_BYTES, write_runtime_secret
from fedinfer.deploy.site_worker import FOREIGN_APP, SiteWorker, foreign_app_reason
from fedinfer.fl.messages import ErrorCodes
from fedinfer.fl.run_config import NodeConfigKeys


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
        return Message(RecordDict({"arrays": ArrayRecord(doubled), "node": node}), reply_to=msg)

    @app.query("crash")
    def crash(msg: Message, context: Context) -> Message:
        raise RuntimeError("boom")

    return app


def _message(message_type: str = "query.echo") -> Message:
    # A coordinator's instruction, as the ServerApp's process identity makes it.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    msg = Message(RecordDict({"arrays": arrays}), 7, message_type, group_id="1")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperNode sets it
    return msg


def _context(node_config: dict[str, str]) -> Context:
    return Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={"x": 1}
    )


def test_the_worker_runs_messages_with_the_sites_own_node_config_and_keeps_state() -> None:
    # Prepare
    calls: list[Context] = []
    own = {NodeConfigKeys.SITE_NAME: "site-a", NodeConfigKeys.DATA_PATH: "/data/a.npz"}
    worker = SiteWorker(_echo_app(calls), node_config=own)
    lying = {NodeConfigKeys.SITE_NAME: "site-b", NodeConfigKeys.DATA_PATH: "/etc/shadow"}
    context = _context(lying)
    # Execute
    first = worker.handle(_message(), context)
    second = worker.handle(_message(), first.context)
    # Assert
    assert first.failure is None and first.sub_status == fr.SubStatus.COMPLETED
    assert dict(second.reply.content.config_records["node"]) == own
    np.testing.assert_array_equal(
        second.reply.content.array_records["arrays"]["w"].numpy(),
        np.arange(6, dtype=np.float32).reshape(2, 3) * 2,
    )
    assert second.context.state.config_records["n"]["n"] == 2


def test_a_crashing_handler_is_an_error_reply_and_a_failed_task_not_a_dead_worker() -> None:
    worker = SiteWorker(_echo_app([]), node_config={})
    # Execute
    crashed = worker.handle(_message("query.crash"), _context({}))
    after = worker.handle(_message(), _context({}))
    # Assert
    assert crashed.reply.has_error()
    assert crashed.reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "boom" in crashed.reply.error.reason
    assert crashed.sub_status == fr.SubStatus.FAILED and "boom" in str(crashed.failure)
    assert not after.reply.has_error()


@pytest.mark.parametrize(
    ("publisher", "clientapp", "refused"),
    [
        (PUBLISHER, COMPONENTS["clientapp"], False),
        ("mallory", COMPONENTS["clientapp"], True),
        (PUBLISHER, "evil.app:app", True),
        ("", "", True),
    ],
    ids=["fedinfer", "other-publisher", "other-clientapp", "unreadable"],
)
def test_only_fedinfers_declared_clientapp_is_answered(
    publisher: str, clientapp: str, refused: bool
) -> None:
    reason = foreign_app_reason(publisher, clientapp)
    assert (reason is not None) == refused
    if reason is not None:
        assert reason.startswith(FOREIGN_APP) and repr(publisher) in reason


def test_a_refusal_runs_nothing_and_says_why() -> None:
    calls: list[Context] = []
    worker = SiteWorker(_echo_app(calls), node_config={})
    outcome = worker.refuse(_message(), _context({}), "not ours")
    assert calls == []
    assert outcome.reply.error.code == ErrorCodes.POLICY_REFUSED
    assert outcome.reply.error.reason == "not ours" and outcome.sub_status == fr.SubStatus.FAILED


# Flower's FAB builder uses a pathspec pattern class that pathspec deprecates (upstream, harmless).
@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")
def test_the_bundle_identity_is_read_from_the_real_fab_without_unpacking_it(
    tmp_path: Path,
) -> None:
    from flwr.cli.build import build_fab_from_disk
    from tests.conftest import tiny_config

    app = write_app_bundle(
        tmp_path / "app", tiny_config("deployment.input_dim=4", "deployment.num_classes=2")
    )
    fab = Fab(hash_str="x", content=build_fab_from_disk(app), verifications={})
    assert fr.app_identity(fab) == (PUBLISHER, COMPONENTS["clientapp"])
    assert foreign_app_reason(*fr.app_identity(fab)) is None
    assert fr.app_identity(Fab("x", b"not a zip", {})) == ("", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app"]  # nothing unpacked


def test_the_runtime_secret_is_fresh_random_and_0600(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    path = write_runtime_secret(tmp_path / "runtime.secret")
    first = path.read_bytes()
    write_runtime_secret(path)
    assert len(first) == SECRET_BYTES and path.read_bytes() != first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runtime.secret"]


def test_flower_touchpoints_are_where_flower_1_42_has_them() -> None:
    """Flower internals the worker uses: if an upgrade moves one, this fails, not a deployment."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode.runtime import run_clientapp

    # The worker does what flwr-clientapp does, with Flower's own functions.
    # Our pull_task_input is Flower's with a short back-off: the same calls, in the same order.
    flower_pull = inspect.getsource(run_clientapp.pull_task_input)
    ours = inspect.getsource(fr.pull_task_input)
    calls = [
        "client.PullTaskInput(PullTaskInputRequest())",
        "TaskIdentity.task_id = res.task_id",
        "TaskIdentity.node_id = res.context.node_id",
        "context_from_proto(res.context)",
        "client.PullMessages(",
        "message_object_trees[0]",
        "make_pull_object_fn_protobuf(client.PullObject, node,",
        "client.ConfirmMessageReceived, node,",
        "return_type=Message,",
        'message.metadata.__dict__["_message_id"] = object_tree.object_id',
    ]
    assert [c in flower_pull for c in calls] == [True] * len(calls)
    assert [c in ours for c in calls] == [True] * len(calls)
    assert "initial_backoff" not in flower_pull  # Flower's default (1 s) is what we change
    params = inspect.signature(fr.pull_and_inflate_object_from_tree).parameters
    assert {"initial_backoff", "backoff_cap"} <= set(params)
    assert fr.push_message is run_clientapp.push_message
    assert fr.push_task_output is run_clientapp.push_task_output
    assert list(inspect.signature(fr.push_task_output).parameters) == [
        "client",
        "context",
        "sub_status",
        "details",
    ]
    assert list(inspect.signature(fr.push_message).parameters) == ["client", "message", "context"]
    # flwr-clientapp installs and imports the FAB: the step the worker leaves out.
    assert "install_from_fab" in inspect.getsource(run_clientapp.run_clientapp)
    # Claims are signed exactly where Flower's own SuperExec signs them.
    assert run_superexec._SUPEREXEC_AUTH_METHODS == {fr.ACQUIRE_TASK}
    assert TaskType.CLIENT_APP == "flwr-clientapp"
    # The SuperNode options the site starts it with.
    usage = subprocess.run(
        [flower_bin("flower-supernode"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in ("--isolation", "--superexec-auth-secret-file", "--host", "--port"):
        assert option in usage
    assert "process" in usage

