"""Run the real ASGI app under uvicorn on a real loopback socket, in a thread."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn

from fedinfer.serving.server import ServeOptions, build_app, uvicorn_config


@contextlib.contextmanager
def running_server(options: ServeOptions, *, expect_ready: bool = True) -> Iterator[str]:
    """Yield the base URL of a server for ``options`` (port taken from a bound socket).

    The app and uvicorn settings are those of ``fedinfer serve`` (build_app, uvicorn_config).
    """
    app = build_app(options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(app, options, log_level="warning")  # the limits of `fedinfer serve`
    config.loop = "asyncio"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    scheme = "https" if options.tls_certfile else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    try:
        _wait_started(server, thread)
        if expect_ready:
            _wait_ready(url, options)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _wait_started(server: uvicorn.Server, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server thread exited during startup")
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start")
        time.sleep(0.01)


def _wait_ready(url: str, options: ServeOptions) -> None:
    verify: ssl.SSLContext | bool = False if options.tls_certfile else True
    deadline = time.monotonic() + 60
    with httpx.Client(verify=verify, trust_env=False) as client:
        while client.get(f"{url}/v2/health/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready")
            time.sleep(0.02)


def options_for(store_root: Path, **overrides: object) -> ServeOptions:
    """Test defaults: torch backend (fast to build), quick polling."""
    base: dict[str, object] = {
        "model_store": store_root,
        "backend": "torch",
        "poll_interval_s": 0.05,
        "port": 0,
    }
    base.update(overrides)
    return ServeOptions(**base)  # type: ignore[arg-type]
