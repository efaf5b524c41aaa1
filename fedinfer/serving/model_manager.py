"""Loaded model versions, hot swap from the ModelStore, and pinned-version access.

Each loaded version owns its backend and its :class:`DynamicBatcher`, so a
forward pass only ever sees one version. A request resolves its model once
(current, or a pinned version) and is answered by that model, which names
itself in the response. A hot swap loads, verifies and warms the new version in
a background thread and then replaces the ``current`` reference in one
assignment on the event loop; requests already queued on the old version finish
there.

Which versions a request may name is a server policy, never the request's:
the current version, the ``keep_versions - 1`` most recently served before it,
and the ``pinned`` versions (loaded at start-up and never evicted). A request
for any other version is refused (:class:`ModelNotFound`, HTTP 404) instead
of loading it on demand, so one client cycling through old versions cannot make
the server load and evict models under everyone else's requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedinfer.artifacts import ModelManifest, ModelStore
from fedinfer.errors import FedInferError, ServingError
from fedinfer.serving import DEFAULT_MAX_BATCH_SIZE
from fedinfer.serving.backends import Backend, build_backend, check_backend
from fedinfer.serving.batcher import DynamicBatcher
from fedinfer.serving.metrics import ServingMetrics
from fedinfer.tasks import serve_outputs

__all__ = [
    "BatchingOptions",
    "LoadedModel",
    "ModelManager",
    "ModelNotFound",
    "ModelNotReady",
    "run_outputs",
]

logger = logging.getLogger(__name__)


class ModelNotFound(ServingError):
    """No such model name or stored version (HTTP 404)."""


class ModelNotReady(ServingError):
    """No version is loaded yet, or a version failed to load (HTTP 503)."""


@dataclass(frozen=True)
class BatchingOptions:
    """Dynamic batching settings (see :mod:`fedinfer.serving.batcher`)."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 1024
    inline_below_ms: float = 0.2
    """Forward passes faster than this run on the event loop (see the batcher)."""


@dataclass
class LoadedModel:
    """One verified, warmed model version with its batcher."""

    version: int
    manifest: ModelManifest
    backend: Backend
    batcher: DynamicBatcher


def run_outputs(
    backend: Backend, x: np.ndarray, *, task: str = "multiclass", threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Forward ``x`` and derive every served output of ``task`` (``fedinfer.tasks``).

    Multiclass: logits, probabilities, predicted_class; binary: the same with one logit and
    P(class 1); multilabel: logits, probabilities, predicted_labels; regression: values.
    """
    raw = np.asarray(backend.predict(x), dtype=np.float32)
    return serve_outputs(task, raw, threshold=threshold)


class ModelManager:
    """Keeps the store's current version loaded and swaps in new ones.

    Parameters
    ----------
    store : ModelStore
        The site's store (read only, except for admin rollback).
    backend : str
        ``torch``, ``int8`` or ``onnx``.
    public_key : Ed25519PublicKey or None
        If given, signatures are re-verified on every load (hashes always are).
    batching : BatchingOptions
        Batcher settings for every loaded version.
    metrics : ServingMetrics
        Where swaps, batch sizes and the served version are recorded.
    poll_interval_s : float
        How often ``CURRENT`` is checked (default: 0.5).
    keep_versions : int
        Versions kept loaded and servable by number: the current one and the
        ``keep_versions - 1`` served before it (default: 2).
    pinned : tuple of int
        Stored versions loaded at start-up and kept loaded (default: none).
    retry_failed_s : float
        A version that failed to load is tried again after this long, so a
        transient error (EMFILE, a file being copied) does not stop hot swap for
        good (default: 5).
    threads : int or None
        Intra-op threads for ONNX Runtime (torch's are set process-wide).
    validation : (x, y) or None
        A labelled split to check non-float backends against the float model.
    max_accuracy_drop : float
        Tolerance of that check (default: 0.01).
    prune_amount : float
        Share of smallest weights zeroed before the backend is built (default: 0); a
        pruned model is checked against the unpruned float model like int8/onnx.
    """

    def __init__(
        self,
        store: ModelStore,
        *,
        backend: str,
        public_key: Ed25519PublicKey | None,
        batching: BatchingOptions,
        metrics: ServingMetrics,
        poll_interval_s: float = 0.5,
        keep_versions: int = 2,
        pinned: tuple[int, ...] = (),
        retry_failed_s: float = 5.0,
        threads: int | None = None,
        validation: tuple[np.ndarray, np.ndarray | None] | None = None,
        max_accuracy_drop: float = 0.01,
        prune_amount: float = 0.0,
    ) -> None:
        self.store = store
        self.backend_name = backend
        self.public_key = public_key
        self.batching = batching
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.keep_versions = max(1, keep_versions)
        self.pinned = tuple(sorted(set(pinned)))
        self.retry_failed_s = retry_failed_s
        self.threads = threads
        self.validation = validation
        self.max_accuracy_drop = max_accuracy_drop
        self.prune_amount = prune_amount
        self.current: LoadedModel | None = None
        self._loaded: OrderedDict[int, LoadedModel] = OrderedDict()
        self._loading: dict[int, asyncio.Future[LoadedModel]] = {}
        self._failed: tuple[int, float] | None = None  # (version, monotonic time of failure)
        self._unservable: dict[int, str] = {}  # pinned versions that failed to load
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="fedinfer-infer")
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="fedinfer-load")
        self._poll_task: asyncio.Task[None] | None = None
        self._swap_lock: asyncio.Lock | None = None

    @property
    def name(self) -> str | None:
        """The served model's name (None before the first load)."""
        return self.current.manifest.name if self.current else None

    @property
    def queue_depth(self) -> int:
        """Requests waiting across every loaded version."""
        return sum(m.batcher.queue_depth for m in self._loaded.values())

    async def start(self) -> None:
        """Load the current version (if any) and start watching the store."""
        self._swap_lock = asyncio.Lock()
        await self.refresh(raise_errors=True)
        await self._load_pinned()
        self._poll_task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop(self) -> None:
        """Stop watching, answer queued requests, release threads."""
        if self._poll_task is not None:
            self._poll_task.cancel()
        for model in self._loaded.values():
            model.batcher.close()
        for model in list(self._loaded.values()):
            await model.batcher.wait_closed()
        self._infer_pool.shutdown(wait=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # the watcher must survive anything; the error is logged
                logger.exception("model store poll failed")

    async def refresh(self, *, raise_errors: bool = False) -> bool:
        """Swap to the store's current version if it changed; return whether it swapped."""
        assert self._swap_lock is not None, "start() first"
        async with self._swap_lock:
            loop = asyncio.get_running_loop()
            target = await loop.run_in_executor(self._load_pool, self.store.current_version)
            if target is None or (self.current and self.current.version == target):
                return False
            if not raise_errors and self._failed is not None and self._failed[0] == target:
                if loop.time() - self._failed[1] < self.retry_failed_s:
                    return False  # already reported; try again later, or when the store moves
            try:
                model = await self._get_or_load(target)
            except (FedInferError, OSError) as exc:  # OSError: EMFILE and the like, transient
                self._failed = (target, loop.time())
                self.metrics.load_failures.inc()
                logger.error(
                    "cannot serve model version %d, keeping %s: %s",
                    target,
                    self.current.version if self.current else "none",
                    exc,
                )
                if raise_errors:
                    raise
                return False
            self._failed = None
            self._swap(model)
            return True

    async def _load_pinned(self) -> None:
        stored = await asyncio.to_thread(self.store.versions)
        for version in self.pinned:
            if version not in stored:
                self._unservable[version] = "not in the model store"
                logger.error("pinned version %d is not in the model store", version)
                continue
            try:
                await self._get_or_load(version)
            except (FedInferError, OSError) as exc:
                self._unservable[version] = "failed to load or verify"
                self.metrics.load_failures.inc()
                logger.error("pinned version %d cannot be served: %s", version, exc)

    def _swap(self, model: LoadedModel) -> None:
        previous = self.current
        self.current = model  # the swap: one assignment, on the event loop
        self._loaded.move_to_end(model.version)
        self._evict()
        self.metrics.model_version.labels(model.manifest.name).set(model.version)
        if previous is not None:
            self.metrics.swaps.inc()
        logger.info(
            "serving %r version %d (was %s)",
            model.manifest.name,
            model.version,
            previous.version if previous else "none",
        )

    def _evict(self) -> None:
        # _loaded is in order of becoming current (pinned ones never move to the end)
        current = self.current.version if self.current else None
        recent = [v for v in self._loaded if v not in self.pinned or v == current]
        for victim in recent[: max(0, len(recent) - self.keep_versions)]:
            if victim != current:
                self._loaded.pop(victim).batcher.close()  # queued requests still complete

    async def get(self, version: int | None = None) -> LoadedModel:
        """Return the current model, or a loaded ``version`` (never loaded because asked).

        Raises
        ------
        ModelNotReady
            Nothing loaded yet, or the pinned ``version`` failed to load or verify.
        ModelNotFound
            ``version`` is not loaded under the serving policy, or not stored at all.
        """
        if version is None:
            if self.current is None:
                raise ModelNotReady("no model version is loaded yet")
            return self.current
        model = self._loaded.get(version)
        if model is not None:
            return model
        if version in self._unservable:
            raise ModelNotReady(
                f"pinned version {version} cannot be served: {self._unservable[version]} "
                "(details in the server log)"
            )
        if version not in await asyncio.to_thread(self.store.versions):
            raise ModelNotFound(f"version {version} is not in the model store")
        raise ModelNotFound(
            f"version {version} is stored but not served: this server serves versions "
            f"{self.loaded_versions()} (the current one, the {self.keep_versions - 1} served "
            "before it, and those pinned with --pin-versions)"
        )

    async def _get_or_load(self, version: int) -> LoadedModel:
        if version in self._loaded:
            return self._loaded[version]
        pending = self._loading.get(version)
        if pending is None:
            pending = asyncio.ensure_future(self._load(version))
            self._loading[version] = pending
            pending.add_done_callback(lambda _: self._loading.pop(version, None))
        return await asyncio.shield(pending)

    async def _load(self, version: int) -> LoadedModel:
        loop = asyncio.get_running_loop()
        backend, manifest = await loop.run_in_executor(self._load_pool, self._load_sync, version)
        batcher = DynamicBatcher(
            lambda x: run_outputs(
                backend, x, task=manifest.task_kind, threshold=manifest.threshold
            ),
            executor=self._infer_pool,
            max_batch_size=self.batching.max_batch_size,
            max_queue_delay_s=self.batching.max_queue_delay_ms / 1000.0,
            max_queue_size=self.batching.max_queue_size,
            on_batch=self.metrics.observe_batch,
            inline_below_s=self.batching.inline_below_ms / 1000.0,
        )
        batcher.start()
        model = LoadedModel(version, manifest, backend, batcher)
        self._loaded[version] = model
        return model

    def _load_sync(self, version: int) -> tuple[Backend, ModelManifest]:
        weights, manifest = self.store.load(version, public_key=self.public_key)
        backend = build_backend(
            self.backend_name,
            weights,
            manifest,
            threads=self.threads,
            prune_amount=self.prune_amount,
        )
        approximate = backend.name != "torch" or self.prune_amount > 0
        if self.validation is not None and approximate:
            x, y = self.validation
            check = check_backend(
                backend,
                build_backend("torch", weights, manifest),
                x,
                y,
                max_accuracy_drop=self.max_accuracy_drop,
                task=manifest.task_kind,
                threshold=manifest.threshold,
            )
            logger.info("backend check v%d: %s", version, check)
        for rows in sorted({1, self.batching.max_batch_size}):  # warm both code paths
            run_outputs(
                backend,
                np.zeros((rows, manifest.input_dim), dtype=np.float32),
                task=manifest.task_kind,
            )
        return backend, manifest

    def loaded_versions(self) -> list[int]:
        """Versions currently loaded, ascending."""
        return sorted(self._loaded)
