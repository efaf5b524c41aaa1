"""The HTTP/1.1 connection protocol: uvicorn's httptools parser with abuse limits.

uvicorn's :class:`HttpToolsProtocol` is the fastest parser it offers (the pure
Python h11 costs more CPU per request, see BENCHMARKS.md "Serving limits"), but
on its own it lets one connection hold the server:

* a client that pipelines requests and never reads the replies grows the
  per-connection pipeline without bound (every parsed request is a queued
  cycle); here the parser is not fed again while ``max_pipeline`` requests
  wait, so the kernel's receive buffer, then the client, absorbs the rest;
* a connection that sends nothing, or dribbles its request headers, stays open
  for ever (uvicorn's keep-alive timeout only runs *between* requests); here a
  request's headers must be complete within ``header_timeout_s`` of its first
  byte (or of the connection opening);
* malformed HTTP is answered 400 by the parser, before the app sees it, so it
  never reached ``/metrics``; here it is counted as ``endpoint="malformed"``.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fedinfer.serving.metrics import ServingMetrics

__all__ = ["DEFAULT_HEADER_TIMEOUT_S", "DEFAULT_MAX_PIPELINE", "limited_protocol"]

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_PIPELINE = 16
_SLICE = 4096  # bytes fed to the parser at a time between requests


class _LimitedHttpTools(HttpToolsProtocol):
    """HttpToolsProtocol with a pipeline bound, a header timeout and counted 400s."""

    metrics: ServingMetrics | None = None
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    max_pipeline: int = DEFAULT_MAX_PIPELINE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held = b""
        self._header_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ header timeout
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's headers."""
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancel the header timer and drop held bytes."""
        self._cancel_header_timer()
        self._held = b""
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        """A new request: its headers must be complete in time."""
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        """Headers done: the body has its own deadline (checked by the app)."""
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        """Start the next pipelined request, then feed the bytes held back by the bound."""
        super().on_response_complete()
        if self._held and not self.transport.is_closing():
            held, self._held = self._held, b""
            self.data_received(held)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_header_timer()  # a request is being answered: give the next one time
            return
        if self.metrics is not None:
            self.metrics.count_request("timeout", 408)
        self.transport.close()

    # ---------------------------------------------------------- pipeline bound
    def data_received(self, data: bytes) -> None:
        """Feed the parser unless ``max_pipeline`` requests already wait; else hold.

        Between requests the bytes are fed in small slices, so one read of thousands of
        tiny pipelined requests cannot queue them all before the bound is checked; a
        request body is fed whole (slicing it would only copy it more often).
        """
        if self._held or len(self.pipeline) >= self.max_pipeline:
            self._held += data  # reading is paused now, so this is at most one read more
            self.flow.pause_reading()
            return
        view, start = memoryview(data), 0
        while start < len(view):
            end = len(view) if self._reading_body() else start + _SLICE
            # httptools reads any buffer; a memoryview slice avoids copying the read
            super().data_received(cast(bytes, view[start:end]))
            start = end
            if self.transport.is_closing():
                return
            if len(self.pipeline) >= self.max_pipeline:
                self._held = bytes(view[start:])
                self.flow.pause_reading()
                return

    def _reading_body(self) -> bool:
        cycle = self.cycle
        return cycle is not None and cycle.more_body and not cycle.response_complete

    # ------------------------------------------------------------- counted 400
    def send_400_response(self, msg: str) -> None:
        """Answer malformed HTTP (as uvicorn does) and count it in ``/metrics``."""
        if self.metrics is not None:
            self.metrics.count_request("malformed", 400)
        super().send_400_response(msg)


def limited_protocol(
    metrics: ServingMetrics | None,
    *,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    max_pipeline: int = DEFAULT_MAX_PIPELINE,
) -> type[asyncio.Protocol]:
    """Return a protocol class for ``uvicorn.Config(http=...)`` bound to these limits.

    ``metrics`` (None: not counted) receives malformed-HTTP 400s and header timeouts.
    """
    return type(
        "FedinferHttpProtocol",
        (_LimitedHttpTools,),
        {
            "metrics": metrics,
            "header_timeout_s": header_timeout_s,
            "max_pipeline": max_pipeline,
        },
    )
