"""PollingGrid: Flower's send_and_receive semantics, with our own pull interval."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedinfer.fl.grid import InProcessGrid, PollingGrid


def _echo_app() -> ClientApp:
    app = ClientApp()

    @app.query("echo")
    def echo(msg: Message, context: Context) -> Message:
        return Message(msg.content, reply_to=msg)

    return app


class SlowGrid(InProcessGrid):
    """Replies become visible only after ``hidden`` pulls (a site still working), then all."""

    def __init__(self, hidden: int) -> None:
        super().__init__(_echo_app(), num_nodes=3, run_id=5)
        self.hidden, self.pulls = hidden, 0

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        self.pulls += 1
        if self.pulls <= self.hidden:
            return []
        return super().pull_messages(message_ids)


def _messages(grid: InProcessGrid) -> list[Message]:
    content = RecordDict({"a": ArrayRecord({"x": Array(np.ones(2, dtype=np.float32))})})
    return [
        grid.create_message(content, "query.echo", node, group_id="1")
        for node in grid.get_node_ids()
    ]


def test_polling_grid_keeps_pulling_until_every_reply_is_in() -> None:
    inner = SlowGrid(hidden=4)
    replies = list(PollingGrid(inner, poll_s=0.0).send_and_receive(_messages(inner)))
    assert len(replies) == 3 and not any(r.has_error() for r in replies)
    assert inner.pulls == 5


def test_polling_grid_returns_what_arrived_when_the_timeout_passes() -> None:
    inner = SlowGrid(hidden=10**9)
    replies = PollingGrid(inner, poll_s=0.0).send_and_receive(_messages(inner), timeout=0.0)
    assert list(replies) == [] and inner.pulls == 1
