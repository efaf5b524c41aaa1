"""Grid helpers: a view that hides sites which can no longer train, a faster-polling view,
and an in-process Grid.

:class:`PollingGrid` collects replies every ``poll_s`` instead of the 3 s that Flower's
deployment Grid (``HttpGrid.send_and_receive``) sleeps between pulls: a pull is one request to
the SuperLink on the same machine, and each exchange otherwise waits 1.5 s on average for it.

:class:`InProcessGrid` runs the real ClientApp object in the coordinator's
process, sequentially, without Ray: the fast path for tests and debugging. The
ServerApp and ClientApp code is the same as under Flower's simulation runtime.
"""

from __future__ import annotations

import random
import time
import traceback
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["ExcludingGrid", "InProcessGrid", "PollingGrid"]

# Flower's code for "the ClientApp raised an exception".
CLIENT_APP_RAISED_EXCEPTION = 2


class ExcludingGrid(Grid):
    """A view of ``grid`` without the nodes in ``excluded`` (e.g. sites out of privacy budget)."""

    def __init__(self, grid: Grid, excluded: set[int]) -> None:
        self._grid = grid
        self.excluded = excluded

    def set_run(self, run: Run) -> None:  # noqa: D102
        self._grid.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self._grid.run

    def create_message(  # noqa: D102
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return [n for n in self._grid.get_node_ids() if n not in self.excluded]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self._grid.pull_messages(message_ids)

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class PollingGrid(ExcludingGrid):
    """A view of ``grid`` whose ``send_and_receive`` pulls replies every ``poll_s`` seconds."""

    def __init__(self, grid: Grid, *, poll_s: float = 0.1) -> None:
        super().__init__(grid, excluded=set())
        self.poll_s = poll_s

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = {i for i in self.push_messages(messages) if i}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self.pull_messages(pending))
            replies += pulled
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_s)
        return replies


class InProcessGrid(Grid):
    """Deliver messages to a ClientApp in this process, one node after another."""

    def __init__(
        self, client_app: ClientApp, *, num_nodes: int, run_id: int, seed: int = 0
    ) -> None:
        rng = random.Random(seed)
        # Messages take their run id from the process's task identity, as in Flower's runtimes.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
            1,
            run_id,
            SUPERLINK_NODE_ID,
        )
        self._app = client_app
        self._run = Run.create_empty(run_id)
        self._contexts: dict[int, Context] = {}
        for partition in range(num_nodes):
            node_id = rng.getrandbits(63)
            self._contexts[node_id] = Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": partition, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Run:  # noqa: D102
        return self._run

    def create_message(  # noqa: D102
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        ids = []
        for msg in messages:
            msg_id = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            self._replies[msg_id] = self._deliver(msg)
            ids.append(msg_id)
        return ids

    def _deliver(self, msg: Message) -> Message:
        context = self._contexts[msg.metadata.dst_node_id]
        try:
            reply = self._app(msg, context)
        except Exception as exc:  # the real runtimes turn a crash into an error reply too
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = context.node_id
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
