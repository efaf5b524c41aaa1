"""Dynamic batching: concurrent requests run as one forward pass.

Policy (one batcher per loaded model version, so a batch never mixes versions):

* an idle model never waits: a lone request is dispatched at once;
* while the model is busy, requests queue; when it frees up, the next batch
  takes everything queued, up to ``max_batch_size`` rows;
* ``max_queue_delay_s`` only matters for a *partial* batch formed under
  continuous load (the previous batch finished less than ``max_queue_delay_s``
  ago): it caps how long that batch waits for more rows. 0 disables waiting;
* the queue is bounded (``max_queue_size`` requests): beyond it,
  :class:`Overloaded` is raised at once so the server can answer 503 with
  ``Retry-After`` instead of letting latency grow without bound.

The forward pass runs in an executor thread; the event loop only moves arrays.
With ``inline_below_s`` set, a batch runs on the event loop instead when recent
forward passes *of the same size class* (rows 1, 2-3, 4-7, ..., 64-127: powers of
two) took less than that on average: for a forward pass of tens of microseconds,
the hand-off to a thread and back (a queue put, two thread wake-ups, a self-pipe
write) costs more CPU than the forward pass itself. The loop is therefore held at
most about ``inline_below_s`` by a model: the first pass of each size class always
runs in the executor, a size class whose passes are slower stays there, and one
slow pass raises the average and sends the next ones of its class back there.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from fedinfer.errors import ServingError

__all__ = ["BatcherClosed", "DynamicBatcher", "Overloaded"]

RunBatch = Callable[[np.ndarray], dict[str, np.ndarray]]


class Overloaded(ServingError):
    """The request queue is full; retry after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatcherClosed(Exception):
    """The model version behind this batcher was retired; resolve the model again."""


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future[tuple[dict[str, np.ndarray], int]]
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Queue of requests for one model version, drained in batches by one task.

    Parameters
    ----------
    run_batch : callable
        ``x -> {output name: array}``, each array with ``len(x)`` rows; called in ``executor``.
    executor : Executor
        Where forward passes run (one thread is the right size on small CPUs).
    max_batch_size : int
        Rows per forward pass; 1 turns batching off.
    max_queue_delay_s : float
        Cap on waiting for more rows under load (see the module docstring) (default: 0).
    max_queue_size : int
        Queued requests before :class:`Overloaded` (default: 1024).
    on_batch : callable or None
        ``(rows, seconds)`` hook called after every forward pass (metrics).
    inline_below_s : float
        Run a forward pass on the event loop while the moving average of recent ones of
        its size class (rows rounded down to a power of two) is below this many
        seconds; 0 always uses ``executor`` (default: 0).
    """

    _EMA_WEIGHT = 0.2

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        executor: Executor,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
        inline_below_s: float = 0.0,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ServingError(
                "max_batch_size and max_queue_size must be >= 1, max_queue_delay_ms >= 0"
            )
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self.inline_below_s = inline_below_s
        # Per size class (rows.bit_length()): unknown until one pass ran in the executor.
        self._forward_ema_s: dict[int, float] = {}
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._last_done = float("-inf")
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not counting the batch being computed)."""
        return len(self._queue)

    def start(self) -> None:
        """Start the draining task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain_forever())

    def close(self) -> None:
        """Refuse new requests; queued ones still complete, then the task ends."""
        self._closed = True
        self._wakeup.set()

    async def wait_closed(self) -> None:
        """Wait until every queued request has been answered after :meth:`close`."""
        if self._task is not None:
            await self._task

    async def submit(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        """Queue ``x`` (``(rows, ...)``) and return its outputs and the size of its batch.

        Raises
        ------
        Overloaded
            The queue is full.
        BatcherClosed
            This batcher was closed (its model version retired).
        """
        if self._closed:
            raise BatcherClosed
        if len(self._queue) >= self.max_queue_size:
            raise Overloaded(
                f"inference queue full ({self.max_queue_size} requests)", retry_after_s=1.0
            )
        future: asyncio.Future[tuple[dict[str, np.ndarray], int]] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.append(_Pending(x, future))
        self._wakeup.set()
        return await future

    async def _drain_forever(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take()
            if self._should_wait_for_more(batch):
                batch = await self._top_up(batch)
            await self._execute(batch)

    def _take(self, batch: list[_Pending] | None = None) -> list[_Pending]:
        batch = batch or []
        rows = sum(len(p.x) for p in batch)
        while self._queue and (not batch or rows + len(self._queue[0].x) <= self.max_batch_size):
            pending = self._queue.popleft()
            batch.append(pending)
            rows += len(pending.x)
        return batch

    def _should_wait_for_more(self, batch: list[_Pending]) -> bool:
        if self.max_queue_delay_s <= 0 or self.max_batch_size == 1:
            return False
        under_load = time.perf_counter() - self._last_done < self.max_queue_delay_s
        return under_load and sum(len(p.x) for p in batch) < self.max_batch_size

    async def _top_up(self, batch: list[_Pending]) -> list[_Pending]:
        deadline = batch[0].enqueued + self.max_queue_delay_s
        while sum(len(p.x) for p in batch) < self.max_batch_size and not self._closed:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
            batch = self._take(batch)
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # skip cancelled requests
        if not live:
            return
        x = np.concatenate([p.x for p in live]) if len(live) > 1 else np.array(live[0].x)
        size_class = len(x).bit_length()
        ema = self._forward_ema_s.get(size_class)
        try:
            if ema is not None and ema < self.inline_below_s:
                outputs, seconds = self._timed_forward(x)
            else:
                outputs, seconds = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._timed_forward, x
                )
        except Exception as exc:  # a failed forward pass fails its requests, not the server
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self._last_done = time.perf_counter()
        self._forward_ema_s[size_class] = (
            seconds if ema is None else ema + self._EMA_WEIGHT * (seconds - ema)
        )
        if self._on_batch is not None:
            self._on_batch(len(x), seconds)
        self._deliver(live, outputs, len(x))

    def _timed_forward(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """Run the model and time the forward pass alone, wherever it runs.

        Timing inside the call (not around the executor hand-off) matters: on a busy
        event loop the wait to resume would count as model time and keep a fast model
        off the loop for good.
        """
        started = time.perf_counter()
        outputs = self._run_batch(x)
        return outputs, time.perf_counter() - started

    @staticmethod
    def _deliver(live: list[_Pending], outputs: dict[str, np.ndarray], rows: int) -> None:
        start = 0
        for p in live:
            stop = start + len(p.x)
            if not p.future.done():
                p.future.set_result(({k: v[start:stop] for k, v in outputs.items()}, rows))
            start = stop
