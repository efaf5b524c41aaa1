"""The Fleet gateway: forwards the Fleet API over verified TLS, never the Control API."""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedinfer.deploy.certs import Pki, init_pki
from fedinfer.deploy.gateway import FleetGateway, is_allowed
from fedinfer.deploy.process import free_port


class Upstream:
    """Stands in for the SuperLink: records every request it receives and echoes it."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append({"path": scope["path"], "headers": headers, "body": body.decode()})
        payload = json.dumps(self.seen[-1]).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _signed_headers(*, age_s: float = 0.0, key: ec.EllipticCurvePrivateKey | None = None):
    """The headers a Flower 1.42 SuperNode signs every Fleet request with."""
    key = key or ec.generate_private_key(ec.SECP384R1())
    stamp = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)).isoformat()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = key.sign(stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return {
        "flwr-public-key": base64.b64encode(pem).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": base64.b64encode(signature).decode(),
    }


def _trusting(ca_cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_cert))


def _serve(app: Any, port: int, pki: Pki) -> uvicorn.Server:
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="error",
            ws="none",
            ssl_certfile=str(pki.server_cert),
            ssl_keyfile=str(pki.server_key),
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.05)
    return server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return init_pki(tmp_path_factory.mktemp("gw") / "pki", hosts=["localhost"])


@pytest.fixture(scope="module")
def gateway(pki: Pki) -> Iterator[tuple[str, Upstream]]:
    upstream, up_port, gw_port = Upstream(), free_port(), free_port()
    servers = [
        _serve(upstream, up_port, pki),
        _serve(FleetGateway(f"https://127.0.0.1:{up_port}", ca_cert=pki.ca_cert), gw_port, pki),
    ]
    yield f"https://127.0.0.1:{gw_port}", upstream
    for server in servers:
        server.should_exit = True


def test_fleet_requests_reach_the_superlink_with_their_auth_headers(
    gateway: tuple[str, Upstream], pki: Pki
) -> None:
    # Prepare
    url, upstream = gateway
    headers = {**_signed_headers(), "content-type": "application/protobuf"}
    # Execute
    with httpx.Client(verify=_trusting(pki.ca_cert), trust_env=False) as client:
        response = client.post(
            f"{url}/v1/fleet/pull-messages", content=b"\x08\x01", headers=headers
        )
    # Assert
    assert response.status_code == 200
    seen = response.json()
    assert seen["path"] == "/v1/fleet/pull-messages" and seen["body"] == "\x08\x01"
    for name in ("flwr-public-key", "flwr-signature", "flwr-timestamp"):
        assert seen["headers"][name] == headers[name]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/runtime/pull-task-input",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/docs",
    ],
    ids=["start-run", "register-node", "runtime", "dot-dot", "encoded-dot-dot", "docs"],
)
def test_everything_but_the_fleet_api_is_refused_without_reaching_the_superlink(
    gateway: tuple[str, Upstream], pki: Pki, path: str
) -> None:
    # Prepare
    url, upstream = gateway
    before = len(upstream.seen)
    # Execute
    with httpx.Client(verify=_trusting(pki.ca_cert), trust_env=False) as client:
        response = client.send(
            client.build_request("POST", httpx.URL(url).copy_with(raw_path=path.encode()))
        )
    # Assert
    assert response.status_code == 404
    assert len(upstream.seen) == before


def test_a_client_that_does_not_trust_the_ca_cannot_connect(
    gateway: tuple[str, Upstream], tmp_path: Path
) -> None:
    other = init_pki(tmp_path / "other", hosts=["localhost"])
    with (
        httpx.Client(verify=_trusting(other.ca_cert), trust_env=False) as client,
        pytest.raises(httpx.ConnectError) as info,
    ):
        client.get(f"{gateway[0]}/health")
    assert isinstance(
        info.value.__context__, ssl.SSLCertVerificationError
    ) or "CERTIFICATE_VERIFY_FAILED" in str(info.value)


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/health", True),
        ("/v1/fleet/push-messages", True),
        ("/v1/fleetX", False),
        ("/v1/fleet/./x", False),
        ("/healthz", False),
    ],
    ids=["health", "fleet", "prefix-trick", "dot", "healthz"],
)
def test_is_allowed(path: str, allowed: bool) -> None:
    assert is_allowed(path) is allowed


def _bad_signature() -> dict[str, str]:
    headers = _signed_headers()
    headers["flwr-signature"] = _signed_headers()["flwr-signature"]  # another key's
    return headers


@pytest.mark.parametrize(
    "headers",
    [{}, _bad_signature(), _signed_headers(age_s=3600), {"flwr-public-key": "cHVi"}],
    ids=["none", "wrong-signature", "stale", "garbage"],
)
def test_unauthenticated_fleet_requests_are_refused_before_the_body_is_read(
    gateway: tuple[str, Upstream], pki: Pki, headers: dict[str, str]
) -> None:
    """An unsigned caller announcing a 200 MiB body is answered 401 at once, unread."""
    # Prepare
    url, upstream = gateway
    before = len(upstream.seen)
    host, port = url.rsplit("//", 1)[1].split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\n{head}"
        f"Content-Length: {200 << 20}\r\n\r\n"
    ).encode()
    # Execute: the body never comes; a gateway that buffers first would wait for it
    with (
        socket.create_connection((host, int(port)), timeout=20) as raw,
        _trusting(pki.ca_cert).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(request + b"\x08" * 1024)
        reply = tls.recv(4096)
    # Assert
    assert reply.startswith(b"HTTP/1.1 401")
    assert len(upstream.seen) == before


def test_a_signed_request_over_the_body_cap_is_413_unread(
    gateway: tuple[str, Upstream], pki: Pki
) -> None:
    url, upstream = gateway
    before = len(upstream.seen)
    host, port = url.rsplit("//", 1)[1].split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in _signed_headers().items())
    request = (
        f"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\n{head}"
        f"Content-Length: {100 << 20}\r\n\r\n"
    ).encode()
    with (
        socket.create_connection((host, int(port)), timeout=20) as raw,
        _trusting(pki.ca_cert).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(request)
        reply = tls.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413")
    assert len(upstream.seen) == before
