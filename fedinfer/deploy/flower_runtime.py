"""The Flower 1.42 internals a site worker drives, in one place.

A site's SuperNode runs with ``--isolation process``: it starts no ``flower-superexec`` and no
``flwr-clientapp`` process; it queues each message from the coordinator as a ``flwr-clientapp``
task on its Runtime API (HTTP on loopback) and waits for a reply. The site worker
(:mod:`fedinfer.deploy.site_worker`) claims those tasks and runs the site's own ClientApp in
process, doing what Flower's ``flwr-clientapp`` process does
(``flwr/supernode/runtime/run_clientapp.py``) except installing and importing the app bundle.

Claiming a task (``AcquireTask``) is signed with the site's SuperExec secret (HMAC, Flower's
``SuperExecAuthHttpInterceptor``): without it a local user could claim the site's tasks, read
the global model and answer for the site. Every other call carries the task's token, which only
the claimant gets. The worker claims a task as soon as the SuperNode creates it, while the
message may still be downloading: its objects are retried every few tens of milliseconds, not
after Flower's 1-10 s back-off for fresh processes.

These are Flower internals, not its public API: every name this module imports is checked by
``tests/test_deploy_flower_runtime.py``, so an upgrade that moves one fails there, loudly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import httpx
from flwr.common.config import get_fab_config
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    SendTaskHeartbeatRequest,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

__all__ = [
    "ACQUIRE_TASK",
    "POLL_INTERVAL_S",
    "PULL_BACKOFF_S",
    "SubStatus",
    "Task",
    "TaskHeartbeat",
    "acquire_task",
    "app_identity",
    "pull_task_input",
    "push_message",
    "push_task_output",
    "runtime_client",
    "task_client",
]

logger = logging.getLogger(__name__)

PULL_BACKOFF_S = (0.02, 0.2)
"""First and longest wait between tries for a message object the SuperNode has not received
yet. Flower's (1 s doubling to 10 s) suits a fresh process that started long after the message
arrived; the worker claims a task within ``POLL_INTERVAL_S``, usually while the SuperNode is
still downloading it, and on loopback a retry costs next to nothing."""
POLL_INTERVAL_S = 0.05
"""How often the worker asks its SuperNode for a task: a loopback call, cheap; 50 ms on average
adds 25 ms to a message (Flower's own SuperExec polls every 1 s)."""
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"
"""The Runtime API method the SuperNode authenticates with the SuperExec secret."""
COMPONENT = "flwr-clientapp"  # what the worker announces itself as (Flower's version header)


def _client(address: str, interceptors: list[Any], *, retry: bool) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # loopback only (the SuperNode binds --host 127.0.0.1)
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=COMPONENT), *interceptors],
        retry_invoker=make_simple_http_retry_invoker() if retry else None,
    )


@contextlib.contextmanager
def runtime_client(address: str, *, secret: bytes) -> Iterator[RuntimeHttpClient]:
    """A Runtime API client that signs ``AcquireTask`` with ``secret`` (no retries: the poll
    loop is the retry)."""
    auth = SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK})
    client = _client(address, [auth], retry=False)
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def task_client(address: str, token: str) -> Iterator[RuntimeHttpClient]:
    """A Runtime API client for one claimed task (its token on every call; Flower's retries)."""
    client = _client(address, [RuntimeTokenHttpInterceptor(token)], retry=True)
    try:
        yield client
    finally:
        client.close()


def acquire_task(client: RuntimeHttpClient) -> tuple[str, Task] | None:
    """Claim the oldest pending ClientApp task: ``(token, task)``, or None when there is none."""
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    if res.HasField("task") and res.token:
        return res.token, res.task
    return None


class TaskHeartbeat:
    """Flower's task heartbeat for one task, as a context manager.

    Unlike ``flwr-clientapp``'s, a refused heartbeat (the SuperNode gave the task up) is
    logged, not turned into SIGINT: the worker is long-lived and must survive its tasks.
    """

    def __init__(self, client: RuntimeHttpClient) -> None:
        self._client = client
        self._sender = HeartbeatSender(self._beat)

    def _beat(self) -> bool:
        try:
            res = self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            logger.warning("task heartbeat refused: %s", err)
            return True  # stop retrying; the push at the end will tell
        if not res.success:
            logger.warning("the SuperNode no longer holds this task (heartbeat refused)")
        return True

    def __enter__(self) -> TaskHeartbeat:
        self._sender.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._sender.is_running:
            self._sender.stop()


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """Pull a claimed task's message, context, run and app bundle from the SuperNode.

    ``flwr-clientapp``'s ``pull_task_input`` step for step (``run_clientapp.py``; the pinning
    test compares), with :data:`PULL_BACKOFF_S` for objects that are still on their way.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run, fab = run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    object_tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        object_tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=PULL_BACKOFF_S[0],
        backoff_cap=PULL_BACKOFF_S[1],
    )
    # The deflated message does not carry its own id (its object id): set it, as Flower does.
    message.metadata.__dict__["_message_id"] = object_tree.object_id
    return message, context, run, fab


def app_identity(fab: Fab) -> tuple[str, str]:
    """The bundle's declared ``(publisher, clientapp component)``, read without running it.

    Only ``pyproject.toml`` is read from the zip (Flower's own parser); nothing is installed,
    unpacked or imported. An unreadable bundle gives ``("", "")``.
    """
    try:
        config = get_fab_config(fab.content)
        app = config.get("tool", {}).get("flwr", {}).get("app", {})
        return str(app.get("publisher", "")), str(app.get("components", {}).get("clientapp", ""))
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, it is not fedinfer's
        logger.warning("the app bundle's pyproject.toml cannot be read: %r", exc)
        return "", ""

