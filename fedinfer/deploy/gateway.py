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

Run as ``python -m fedinfer.deploy.gateway`` (``fedinfer coordinator`` does).
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ALLOWED_PATHS", "ALLOWED_PREFIXES", "FleetGateway", "is_allowed", "main"]

logger = logging.getLogger(__name__)

ALLOWED_PREFIXES = ("/v1/fleet/",)
ALLOWED_PATHS = ("/health",)
MAX_BODY_BYTES = 256 << 20
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


class FleetGateway:
    """ASGI app forwarding allowed paths to ``upstream`` (the loopback SuperLink) over TLS."""

    def __init__(self, upstream: str, *, ca_cert: Path, timeout_s: float = 300.0) -> None:
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
        body = await _read_body(receive)
        if body is None:
            await _reply(send, 413, {"detail": f"request body over {MAX_BODY_BYTES} bytes"})
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


async def _read_body(receive: Receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        event = await receive()
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not event.get("more_body", False):
            return b"".join(chunks)


async def _reply(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Fleet poll is noise
    uvicorn.run(
        FleetGateway(args.upstream, ca_cert=args.ca_cert),
        host=args.host,
        port=args.port,
        ssl_certfile=str(args.certfile),
        ssl_keyfile=str(args.keyfile),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        ws="none",
    )


if __name__ == "__main__":  # pragma: no cover
    main()
