"""The Fleet gateway: the only part of the coordinator that sites (and the internet) can reach.

Flower 1.42's SuperLink serves its Fleet API (SuperNodes), Control API (start
runs, *register nodes*) and Runtime API on one HTTPS port, and the Control API
has no account authentication without Flower's enterprise plugins. Exposing
that port would let anyone who reaches it register a node key or start a run.
So the SuperLink binds loopback only, and this small TLS reverse proxy, bound
to the public address, forwards exactly the Fleet API (``/v1/fleet/...``) and
``/health``; every other path is answered 404 without touching the SuperLink.
Node-authentication headers (signed timestamps) pass through unchanged, so the
SuperLink still verifies every SuperNode itself.

One hostile client must not exhaust the gateway either, so before a byte of
a Fleet request body is read the gateway checks what it can check alone: the
SuperNode's signed timestamp (``flwr-public-key``/``flwr-timestamp``/
``flwr-signature``: an ECDSA-SHA256 signature over a timestamp at most five
minutes old, as Flower's SuperLink checks it; whether the key is a *registered*
node stays the SuperLink's call) and the declared body size. Bodies are capped
at ``--max-body-bytes`` (default 32 MiB, far below the 256 MiB once buffered),
must arrive within a timeout, and connections are limited (``--limit-concurrency``,
with the header timeout and pipeline bound of :mod:`fedinfer.serving.protocol`).

Run as ``python -m fedinfer.deploy.gateway`` (``fedinfer coordinator`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import datetime as dt
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "ALLOWED_PATHS",
    "ALLOWED_PREFIXES",
    "FleetGateway",
    "is_allowed",
    "main",
    "node_signature_ok",
]

logger = logging.getLogger(__name__)

ALLOWED_PREFIXES = ("/v1/fleet/",)
ALLOWED_PATHS = ("/health",)
MAX_BODY_BYTES = 32 << 20
BODY_TIMEOUT_S = 60.0
# Flower 1.42's window for a SuperNode's signed timestamp (TIMESTAMP_TOLERANCE and
# SYSTEM_TIME_TOLERANCE in flwr.common.constant).
_MAX_AGE_S, _CLOCK_SKEW_S = 300.0, 5.0
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def is_allowed(path: str) -> bool:
    """Whether the gateway forwards ``path`` (Fleet API and health probe only).

    Dot segments are refused outright: an HTTP client normalises
    ``/v1/fleet/../control/...`` to a Control API path on the way upstream.
    """
    if any(segment in (".", "..") for segment in path.split("/")) or "\\" in path:
        return False
    return path in ALLOWED_PATHS or path.startswith(ALLOWED_PREFIXES)


def node_signature_ok(headers: dict[bytes, bytes], *, now: dt.datetime | None = None) -> bool:
    """Whether a Fleet request carries a valid SuperNode signed timestamp.

    The check Flower's SuperLink makes (ECDSA-SHA256 over the ``flwr-timestamp``
    value, by the PEM key in ``flwr-public-key``, at most 5 minutes old), without
    the registry lookup; the SuperLink still makes all of it.
    """
    try:
        pem = base64.b64decode(headers[b"flwr-public-key"], validate=True)
        signature = base64.b64decode(headers[b"flwr-signature"], validate=True)
        stamp = headers[b"flwr-timestamp"].decode("ascii")
        age = ((now or dt.datetime.now(dt.UTC)) - dt.datetime.fromisoformat(stamp)).total_seconds()
        if not -_CLOCK_SKEW_S < age < _MAX_AGE_S + _CLOCK_SKEW_S:
            return False
        key = serialization.load_pem_public_key(pem)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        key.verify(signature, stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except (
        KeyError,
        ValueError,
        TypeError,
        UnicodeError,
        binascii.Error,
        InvalidSignature,
        UnsupportedAlgorithm,
    ):
        return False
    return True


class FleetGateway:
    """ASGI app forwarding allowed paths to ``upstream`` (the loopback SuperLink) over TLS.

    Parameters
    ----------
    upstream : str
        The SuperLink's loopback URL.
    ca_cert : Path
        CA that signed the SuperLink's certificate.
    timeout_s : float
        Upstream request timeout (default: 300).
    max_body_bytes : int
        Largest Fleet request body (default: 32 MiB); larger ones get 413 unread.
    body_timeout_s : float
        A request body must arrive within this (default: 60 s), else 408.
    """

    def __init__(
        self,
        upstream: str,
        *,
        ca_cert: Path,
        timeout_s: float = 300.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        context = ssl.create_default_context(cafile=str(ca_cert))
        self.client = httpx.AsyncClient(
            base_url=upstream, verify=context, timeout=timeout_s, trust_env=False
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if not is_allowed(path):
            await _reply(
                send, 404, {"detail": "not served here: the gateway forwards the Fleet API only"}
            )
            return
        headers_in = dict(scope["headers"])
        if path != "/health" and not node_signature_ok(headers_in):  # before reading the body
            await _reply(send, 401, {"detail": "Invalid SuperNode authentication"})
            return
        declared = headers_in.get(b"content-length", b"0")
        too_big = {"detail": f"request body over {self.max_body_bytes} bytes"}
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await _reply(send, 413, too_big, close=True)
            return
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body = await _read_body(receive, self.max_body_bytes)
        except TimeoutError:
            await _reply(send, 408, {"detail": "request body too slow"}, close=True)
            return
        if body is None:
            await _reply(send, 413, too_big, close=True)
            return
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in _HOP_BY_HOP
        ]
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            upstream = await self.client.request(
                scope["method"],
                path + (f"?{query}" if query else ""),
                headers=headers,
                content=body,
            )
        except httpx.TransportError as exc:
            logger.warning("SuperLink unreachable for %s: %s", path, exc)
            await _reply(send, 502, {"detail": "the SuperLink is not reachable"})
            return
        out = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in upstream.headers.multi_items()
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"
        ]
        out.append((b"content-length", str(len(upstream.content)).encode()))
        await send({"type": "http.response.start", "status": upstream.status_code, "headers": out})
        await send({"type": "http.response.body", "body": upstream.content})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        event = await receive()
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not event.get("more_body", False):
            return b"".join(chunks)


async def _reply(send: Send, status: int, payload: dict[str, Any], *, close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:  # an unread body must not be parsed as the next request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    """``python -m fedinfer.deploy.gateway``: serve the gateway until SIGTERM."""
    import uvicorn

    parser = argparse.ArgumentParser(
        description="TLS gateway exposing only the SuperLink's Fleet API"
    )
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="https://127.0.0.1:PORT of the SuperLink")
    parser.add_argument("--ca-cert", type=Path, required=True)
    parser.add_argument("--certfile", type=Path, required=True)
    parser.add_argument("--keyfile", type=Path, required=True)
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=MAX_BODY_BYTES,
        help=f"largest Fleet request body (default: {MAX_BODY_BYTES >> 20} MiB)",
    )
    parser.add_argument(
        "--limit-concurrency",
        type=int,
        default=256,
        help="open connections + requests before 503 (default: 256)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Fleet poll is noise
    from fedinfer.serving.protocol import limited_protocol
    from fedinfer.serving.server import TLS_CIPHERS, tls_context

    config = uvicorn.Config(
        FleetGateway(args.upstream, ca_cert=args.ca_cert, max_body_bytes=args.max_body_bytes),
        host=args.host,
        port=args.port,
        http=limited_protocol(None),  # header timeout, pipeline bound
        limit_concurrency=args.limit_concurrency,
        ssl_certfile=str(args.certfile),
        ssl_keyfile=str(args.keyfile),
        ssl_ciphers=TLS_CIPHERS,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        ws="none",
    )
    config.load()
    config.ssl = tls_context(args.certfile, args.keyfile)  # TLS 1.2+, explicit ciphers
    uvicorn.Server(config).run()


if __name__ == "__main__":  # pragma: no cover
    main()
