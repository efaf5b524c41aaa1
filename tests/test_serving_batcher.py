"""Dynamic batching policy, exercised with a real model and a real worker thread."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from artifact_factory import INPUT_DIM, tiny_weights

from fedinfer.artifacts import ModelManifest, TensorSpec
from fedinfer.serving.backends import build_backend
from fedinfer.serving.batcher import BatcherClosed, DynamicBatcher, Overloaded
from fedinfer.serving.model_manager import run_outputs


def _manifest() -> ModelManifest:
    return ModelManifest(
        name="m",
        version=1,
        server_round=1,
        created="",
        run_id="r",
        weights_sha256="",
        model={"name": "cnn1d", "hidden_sizes": [128, 64], "channels": 8, "groups": 4},
        inputs=(TensorSpec("input", (-1, INPUT_DIM), "FP32"),),
        outputs=(TensorSpec("logits", (-1, 10), "FP32"),),
    )


class GatedModel:
    """A real cnn1d forward pass that waits at a gate, so tests control when the model is busy."""

    def __init__(self) -> None:
        self.backend = build_backend("torch", tiny_weights("cnn1d"), _manifest())
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batch_sizes: list[int] = []

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.batch_sizes.append(len(x))
        self.started.set()
        self.gate.wait(timeout=10)
        return run_outputs(self.backend, x)


async def _wait_for(event: threading.Event) -> None:
    for _ in range(1000):
        if event.is_set():
            return
        await asyncio.sleep(0.005)
    raise TimeoutError


def test_idle_model_runs_at_once_and_busy_model_takes_everything_queued() -> None:
    """First request starts alone (no waiting); five arriving meanwhile form ONE next batch,
    and every request gets exactly its own rows of the batched result."""

    async def scenario() -> None:
        # Prepare
        model = GatedModel()
        pool = ThreadPoolExecutor(1)
        batcher = DynamicBatcher(model, executor=pool, max_batch_size=64, max_queue_delay_s=0.5)
        batcher.start()
        rng = np.random.default_rng(0)
        xs = [rng.normal(size=(n, INPUT_DIM)).astype(np.float32) for n in (1, 2, 1, 3, 1, 2)]
        # Execute
        first = asyncio.ensure_future(batcher.submit(xs[0]))
        await _wait_for(model.started)  # dispatched although a 0.5 s delay was allowed
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in xs[1:]]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        # Assert
        assert model.batch_sizes == [1, 9]
        assert [size for _, size in results] == [1, 9, 9, 9, 9, 9]
        for x, (outputs, _) in zip(xs, results, strict=True):
            alone = run_outputs(model.backend, x)
            np.testing.assert_allclose(outputs["logits"], alone["logits"], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(outputs["predicted_class"], alone["predicted_class"])
        batcher.close()
        await batcher.wait_closed()
        pool.shutdown()

    asyncio.run(scenario())


def test_batches_never_exceed_max_batch_size_and_batching_can_be_off() -> None:
    async def scenario(max_batch_size: int) -> list[int]:
        model = GatedModel()
        pool = ThreadPoolExecutor(1)
        batcher = DynamicBatcher(model, executor=pool, max_batch_size=max_batch_size)
        batcher.start()
        x = np.zeros((1, INPUT_DIM), dtype=np.float32)
        pending = [asyncio.ensure_future(batcher.submit(x)) for _ in range(7)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(*pending)
        pool.shutdown()
        return model.batch_sizes

    assert asyncio.run(scenario(3)) == [3, 3, 1]  # all seven were queued before the first ran
    assert asyncio.run(scenario(1)) == [1] * 7


def test_full_queue_sheds_load_and_closed_batcher_refuses() -> None:
    async def scenario() -> None:
        # Prepare
        model = GatedModel()
        pool = ThreadPoolExecutor(1)
        batcher = DynamicBatcher(model, executor=pool, max_batch_size=4, max_queue_size=2)
        batcher.start()
        x = np.zeros((1, INPUT_DIM), dtype=np.float32)
        running = asyncio.ensure_future(batcher.submit(x))
        await _wait_for(model.started)
        queued = [asyncio.ensure_future(batcher.submit(x)) for _ in range(2)]
        await asyncio.sleep(0)
        # Execute / Assert
        with pytest.raises(Overloaded) as info:
            await batcher.submit(x)
        assert info.value.retry_after_s > 0
        batcher.close()
        with pytest.raises(BatcherClosed):
            await batcher.submit(x)
        model.gate.set()
        await asyncio.gather(running, *queued)  # queued work still completes after close
        await batcher.wait_closed()
        pool.shutdown()

    asyncio.run(scenario())


def test_a_failing_forward_fails_its_requests_not_the_batcher() -> None:
    async def scenario() -> None:
        calls = []

        def flaky(x: np.ndarray) -> dict[str, np.ndarray]:
            calls.append(len(x))
            if len(calls) == 1:
                raise RuntimeError("boom")
            return {"logits": x[:, :2]}

        pool = ThreadPoolExecutor(1)
        batcher = DynamicBatcher(flaky, executor=pool, max_batch_size=4)
        batcher.start()
        x = np.ones((1, 3), dtype=np.float32)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(x)
        outputs, _ = await batcher.submit(x)
        assert outputs["logits"].shape == (1, 2)
        pool.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("inline", [False, True], ids=["executor", "inline"])
def test_fast_forward_passes_move_onto_the_event_loop_only_when_enabled(inline: bool) -> None:
    """The first pass always runs in the executor; with ``inline_below_s`` set above the
    measured pass time, later passes run on the event loop's thread, with the same answers."""
    backend = build_backend("torch", tiny_weights("cnn1d"), _manifest())
    threads: list[int] = []

    def model(x: np.ndarray) -> dict[str, np.ndarray]:
        threads.append(threading.get_ident())
        return run_outputs(backend, x)

    async def scenario() -> tuple[int, list[np.ndarray]]:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(
                model,
                executor=pool,
                max_batch_size=1,
                inline_below_s=3600.0 if inline else 0.0,
            )
            batcher.start()
            xs = [np.full((1, INPUT_DIM), i, dtype=np.float32) for i in range(4)]
            outs = [(await batcher.submit(x))[0]["logits"] for x in xs]
            batcher.close()
            await batcher.wait_closed()
            return threading.get_ident(), outs

    loop_thread, outs = asyncio.run(scenario())
    assert threads[0] != loop_thread
    assert all((t == loop_thread) == inline for t in threads[1:])
    for i, out in enumerate(outs):
        expected = run_outputs(backend, np.full((1, INPUT_DIM), i, dtype=np.float32))["logits"]
        np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_a_slow_batch_size_never_runs_on_the_event_loop() -> None:
    """Inline execution is decided per size class: 1-row passes are fast and move onto the
    loop, while 64-row passes, slower than the threshold, always stay in the executor."""
    threads: dict[int, list[int]] = {1: [], 64: []}

    def model(x: np.ndarray) -> dict[str, np.ndarray]:
        threads[len(x)].append(threading.get_ident())
        if len(x) > 1:
            time.sleep(0.02)  # far above the 5 ms threshold below
        return {"logits": x[:, :2].copy()}

    async def scenario() -> int:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(model, executor=pool, max_batch_size=64, inline_below_s=0.005)
            batcher.start()
            for _ in range(3):
                await batcher.submit(np.ones((1, INPUT_DIM), dtype=np.float32))
                await batcher.submit(np.ones((64, INPUT_DIM), dtype=np.float32))
            batcher.close()
            await batcher.wait_closed()
            return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert threads[1][0] != loop_thread and threads[1][1:] == [loop_thread, loop_thread]
    assert len(threads[64]) == 3 and loop_thread not in threads[64]


def test_the_inline_decision_times_the_forward_pass_alone() -> None:
    """On a busy event loop the wait to resume after the executor is not model time: a
    fast model still moves onto the loop (timing around the hand-off kept it off for good)."""
    threads: list[int] = []

    def model(x: np.ndarray) -> dict[str, np.ndarray]:
        threads.append(threading.get_ident())
        return {"logits": x[:, :2].copy()}

    async def hog() -> None:  # other work holding the loop, as 64 connections do
        while True:
            time.sleep(0.01)
            await asyncio.sleep(0)

    async def scenario() -> int:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(model, executor=pool, max_batch_size=1, inline_below_s=0.005)
            batcher.start()
            busy = asyncio.get_running_loop().create_task(hog())
            for _ in range(4):
                await batcher.submit(np.ones((1, INPUT_DIM), dtype=np.float32))
            busy.cancel()
            batcher.close()
            await batcher.wait_closed()
            return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert threads[0] != loop_thread, "the first pass of a size class runs in the executor"
    assert threads[1:] == [loop_thread] * 3
