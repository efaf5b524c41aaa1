"""TLS, bearer-token auth (401/403), per-principal rate limits (429), token storage."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import ssl
import stat
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from artifact_factory import INPUT_DIM, publish_versions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from serving_harness import options_for, running_server

from fedinfer.artifacts import generate_signing_key
from fedinfer.cli import main as cli_main
from fedinfer.serving.auth import RateLimiter, TokenFile, add_token, revoke_tokens

BODY = {
    "inputs": [
        {"name": "input", "shape": [1, INPUT_DIM], "datatype": "FP32", "data": [0.0] * INPUT_DIM}
    ]
}


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


def test_tls_serves_https_with_a_verified_certificate(tmp_path: Path) -> None:
    # Prepare
    store = publish_versions(tmp_path, generate_signing_key(), [1])
    certfile, keyfile = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(certfile))
    options = options_for(store.root, tls_certfile=certfile, tls_keyfile=keyfile)
    with running_server(options) as url:
        # Execute
        with httpx.Client(base_url=url, verify=trust) as client:
            resp = client.post("/v2/models/digits/infer", json=BODY)
        with httpx.Client(base_url=url) as untrusting, pytest.raises(httpx.ConnectError):
            untrusting.get("/v2/health/live")  # default trust store rejects the self-signed cert
        plain = url.replace("https://", "http://")
        with httpx.Client(base_url=plain) as cleartext, pytest.raises(httpx.HTTPError):
            cleartext.get("/v2/health/live")
    # Assert
    assert url.startswith("https://") and resp.status_code == 200


@pytest.fixture()
def secured(tmp_path: Path):
    store = publish_versions(tmp_path, generate_signing_key(), [1, 2])
    tokens = tmp_path / "tokens.json"
    infer = add_token(tokens, principal="clinic-a", roles=["infer"])
    admin = add_token(tokens, principal="ops", roles=["admin"])
    limited = add_token(tokens, principal="batchy", roles=["infer"], rate_limit=0.5)
    with running_server(options_for(store.root, auth_tokens=tokens)) as url:
        yield url, tokens, {"infer": infer, "admin": admin, "limited": limited}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_missing_or_wrong_token_is_401_and_missing_role_is_403(secured) -> None:
    url, _, tok = secured
    with httpx.Client(base_url=url) as client:
        # Execute
        anonymous = client.post("/v2/models/digits/infer", json=BODY)
        wrong = client.post("/v2/models/digits/infer", json=BODY, headers=_auth("fi_nope"))
        basic = client.post(
            "/v2/models/digits/infer", json=BODY, headers={"Authorization": "Basic dXNlcjpwdw=="}
        )
        ok = client.post("/v2/models/digits/infer", json=BODY, headers=_auth(tok["infer"]))
        forbidden = client.post(
            "/v2/repository/models/digits/rollback", json={}, headers=_auth(tok["infer"])
        )
        admin = client.post(
            "/v2/repository/models/digits/rollback", json={}, headers=_auth(tok["admin"])
        )
        health = client.get("/v2/health/ready")
    # Assert
    assert anonymous.status_code == 401
    assert "bearer" in anonymous.headers["www-authenticate"].lower()
    assert wrong.status_code == 401 and basic.status_code == 401
    assert ok.status_code == 200
    assert forbidden.status_code == 403 and "admin" in forbidden.json()["error"]
    assert admin.status_code == 200 and admin.json()["model_version"] == "1"
    assert health.status_code == 200  # probes need no token


def test_rate_limit_is_per_principal_with_retry_after(secured) -> None:
    url, _, tok = secured
    with httpx.Client(base_url=url) as client:
        # Execute: 0.5 req/s with a bucket of 1 -> the second immediate request is refused
        first = client.post("/v2/models/digits/infer", json=BODY, headers=_auth(tok["limited"]))
        second = client.post("/v2/models/digits/infer", json=BODY, headers=_auth(tok["limited"]))
        other = client.post("/v2/models/digits/infer", json=BODY, headers=_auth(tok["infer"]))
    # Assert
    assert first.status_code == 200
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert other.status_code == 200


def test_tokens_file_holds_only_hashes_and_is_owner_only(tmp_path: Path, capsys) -> None:
    # Prepare
    path = tmp_path / "tokens.json"
    # Execute
    code = cli_main(
        ["tokens", "add", "--file", str(path), "--principal", "lab-1", "--role", "infer"]
    )
    token = capsys.readouterr().out.strip()
    # Assert
    text = path.read_text()
    assert code == 0 and token.startswith("fi_") and token not in text
    assert json.loads(text)["tokens"][0]["principal"] == "lab-1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    principal = TokenFile(path).authenticate(token)
    assert principal is not None and principal.can("infer") and not principal.can("admin")
    assert TokenFile(path).authenticate(token[:-1] + "x") is None
    assert revoke_tokens(path, principal="lab-1") == 1
    assert TokenFile(path).authenticate(token) is None


def test_new_token_is_accepted_without_restart(secured) -> None:
    url, tokens, _ = secured
    late = add_token(tokens, principal="late", roles=["infer"])
    with httpx.Client(base_url=url) as client:
        for _ in range(100):  # the server re-reads a changed file within about a second
            resp = client.post("/v2/models/digits/infer", json=BODY, headers=_auth(late))
            if resp.status_code == 200:
                break
            time.sleep(0.05)
    assert resp.status_code == 200


def test_bad_token_arguments_are_config_errors(tmp_path: Path, capsys) -> None:
    code = cli_main(
        [
            "tokens",
            "add",
            "--file",
            str(tmp_path / "t.json"),
            "--principal",
            "a b",
            "--role",
            "infer",
        ]
    )
    assert code == 2 and "--principal" in capsys.readouterr().err


def test_token_bucket_refills_at_the_configured_rate() -> None:
    from fedinfer.serving.auth import Principal

    limiter = RateLimiter(rate=1000.0, burst=2)
    p = Principal("x", frozenset({"infer"}))
    assert limiter.acquire(p) == 0 and limiter.acquire(p) == 0
    wait = limiter.acquire(p)
    assert 0 < wait <= 0.001 + 1e-9
    assert np.isclose(RateLimiter(rate=0).acquire(p), 0.0)


def test_a_corrupted_tokens_file_keeps_the_previous_tokens(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "tokens.json"
    token = add_token(path, principal="a", roles=["infer"])
    tokens = TokenFile(path, recheck_s=0.0)
    # Execute: a half-written edit
    path.write_text('{"tokens": [{"principal": ')
    os.utime(path, ns=(1, 1))  # a surely different mtime, so the file is re-read
    # Assert
    assert tokens.authenticate(token) is not None
