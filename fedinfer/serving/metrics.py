"""Prometheus metrics of one server (own registry, so several apps can share a process).

Under ``fedinfer serve --workers N`` each worker process runs with
``PROMETHEUS_MULTIPROC_DIR`` set (by the parent, before prometheus_client is imported):
its values live in that directory's memory-mapped files and ``/metrics``, whichever
worker answers it, sums every worker's counters and histograms (those of workers that
died too, so counters never go back). ``fedinfer_queue_depth`` is the sum over live
workers; ``fedinfer_model_version`` has one series per live worker (label ``pid``).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

__all__ = ["ServingMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    """The server's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fedinfer_requests",
            "Requests by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fedinfer_request_latency_seconds",
            "Request latency (inference endpoints).",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.infer_latency = self.latency.labels("infer")
        self.batch_size = Histogram(
            "fedinfer_batch_size",
            "Rows per forward pass.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            "fedinfer_batch_seconds",
            "Seconds per forward pass.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "fedinfer_queue_depth",
            "Requests waiting for a forward pass.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.model_version = Gauge(
            "fedinfer_model_version",
            "Version currently served.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.swaps = Counter(
            "fedinfer_model_swaps", "Hot swaps of the served version.", registry=self.registry
        )
        self.load_failures = Counter(
            "fedinfer_model_load_failures",
            "Versions that failed to load or verify.",
            registry=self.registry,
        )

        self._request_children: dict[tuple[str, int], Counter] = {}
        self._exposed = self.registry
        shared = os.environ.get(MULTIPROC_ENV)
        if shared:  # one of several worker processes: expose the sum over all of them
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, path=shared)

    def count_request(self, endpoint: str, status: int) -> None:
        """Count one request (label children cached: this runs on every request)."""
        child = self._request_children.get((endpoint, status))
        if child is None:
            child = self.requests.labels(endpoint, str(status))
            self._request_children[(endpoint, status)] = child
        child.inc()

    def observe_batch(self, rows: int, seconds: float) -> None:
        """Record one forward pass."""
        self.batch_size.observe(rows)
        self.batch_latency.observe(seconds)

    def render(self) -> bytes:
        """Text exposition format (every worker's values summed, under ``--workers N``)."""
        return generate_latest(self._exposed)
