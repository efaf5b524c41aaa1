"""One hostile client against the inference server, over a real socket (issue 12).

Every case asserts the server answers 4xx (never 5xx), stays ready afterwards, and,
for the cases that used to grow memory, that the process RSS stays within a
generous bound. Each test here failed on the server before the fix it names.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import ssl
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from artifact_factory import INPUT_DIM, publish_versions
from serving_harness import options_for, running_server

from fedinfer.artifacts import generate_signing_key
from fedinfer.errors import ConfigError
from fedinfer.serving.auth import add_token
from fedinfer.serving.server import build_app

MAX_BATCH = 64


def _body(rows: int = 1, data: object = None) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": [rows, INPUT_DIM],
                "datatype": "FP32",
                "data": [0.25] * (rows * INPUT_DIM) if data is None else data,
            }
        ]
    }


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _assert_ready(url: str) -> None:
    with httpx.Client(base_url=url, trust_env=False) as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert client.post("/v2/models/digits/infer", json=_body()).status_code == 200


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.rsplit("//", 1)[1].split(":")
    return host, int(port)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    root = tmp_path_factory.mktemp("abuse")
    store = publish_versions(root, generate_signing_key(), [1, 2, 3])
    options = options_for(
        store.root,
        max_batch_size=MAX_BATCH,
        header_timeout_s=0.5,
        body_timeout_s=0.5,
        max_pipeline=4,
    )
    with running_server(options) as url:
        yield url, store


# ---------------------------------------------------------------- 1, 10: input handling
VERSION_PATHS = [
    "/v2/models/digits/versions/%C2%B2/infer",  # superscript two: isdigit() but int() fails
    "/v2/models/digits/versions/%E2%91%A0/ready",  # circled one
    "/v2/models/digits/versions/%EF%BC%93/infer",  # fullwidth 3: int() aliases version 3
    "/v2/models/digits/versions/%D9%A3/infer",  # Arabic-Indic 3
    "/v2/models/digits/versions/00003/infer",  # leading zeros alias version 3
]


@pytest.mark.parametrize(
    "path", VERSION_PATHS, ids=["superscript", "circled", "fullwidth", "arabic", "zeros"]
)
def test_a_version_segment_is_ascii_digits_without_leading_zeros(site, path: str) -> None:
    url, _ = site
    with httpx.Client(base_url=url) as client:
        method = "GET" if path.endswith("/ready") else "POST"
        resp = client.request(method, path, json=_body())
    assert resp.status_code == 404 and "versions are integers" in resp.json()["error"]
    _assert_ready(url)


@pytest.mark.parametrize(
    "data",
    [["0.5"] * INPUT_DIM, [True] * INPUT_DIM, [None] * INPUT_DIM, ["x"] + [0.0] * (INPUT_DIM - 1)],
    ids=["strings", "booleans", "nulls", "one-string"],
)
def test_non_numbers_for_an_fp32_input_are_refused(site, data: list[object]) -> None:
    url, _ = site
    with httpx.Client(base_url=url) as client:
        resp = client.post("/v2/models/digits/infer", json=_body(data=data))
    assert resp.status_code == 400 and "list of numbers" in resp.json()["error"]
    _assert_ready(url)


# ------------------------------------------------------------------ 9: request encodings
def test_gzip_and_deflate_bodies_are_decoded(site) -> None:
    url, _ = site
    raw = json.dumps(_body(rows=2)).encode()
    with httpx.Client(base_url=url) as client:
        answers = [
            client.post(
                "/v2/models/digits/infer",
                content=blob,
                headers={"content-encoding": name, "content-type": "application/json"},
            )
            for name, blob in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw)))
        ]
        plain = client.post("/v2/models/digits/infer", content=raw).json()
    assert [a.status_code for a in answers] == [200, 200]
    assert all(a.json()["outputs"] == plain["outputs"] for a in answers)


def test_unknown_or_bomb_encodings_are_4xx(site) -> None:
    url, _ = site
    bomb = gzip.compress(b" " * (20 << 20))  # 20 MiB of spaces in ~20 KiB
    with httpx.Client(base_url=url) as client:
        brotli = client.post(
            "/v2/models/digits/infer", content=b"xx", headers={"content-encoding": "br"}
        )
        exploded = client.post(
            "/v2/models/digits/infer", content=bomb, headers={"content-encoding": "gzip"}
        )
        broken = client.post(
            "/v2/models/digits/infer", content=b"\x1f\x8bnot", headers={"content-encoding": "gzip"}
        )
    assert brotli.status_code == 415 and "Content-Encoding" in brotli.json()["error"]
    assert exploded.status_code == 413 and "decompressed" in exploded.json()["error"]
    assert broken.status_code == 400
    _assert_ready(url)


# ------------------------------------------------------------ 11: malformed HTTP counted
def test_malformed_http_is_answered_400_and_counted(site) -> None:
    url, _ = site
    with socket.create_connection(_host_port(url), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost x\r\n\r\n")  # no colon
        reply = sock.recv(4096)
    with httpx.Client(base_url=url) as client:
        metrics = client.get("/metrics").text
    assert reply.startswith(b"HTTP/1.1 400")
    assert re.search(r'fedinfer_requests_total\{endpoint="malformed",status="400"\} [1-9]', metrics)
    _assert_ready(url)


# --------------------------------------------------------------------- 6: max batch size
def test_a_request_larger_than_max_batch_runs_in_bounded_passes(site) -> None:
    url, _ = site
    rows = 40 * MAX_BATCH + 7
    x = np.random.default_rng(0).normal(size=(rows, INPUT_DIM)).astype(np.float32)
    body = _body(rows=rows, data=x.ravel().tolist())
    with httpx.Client(base_url=url, timeout=60) as client:
        big = client.post("/v2/models/digits/infer", json=body).json()
        small = client.post(
            "/v2/models/digits/infer", json=_body(rows=3, data=x[-3:].ravel().tolist())
        ).json()
        metrics = client.get("/metrics").text
    within = float(re.search(r'fedinfer_batch_size_bucket\{le="64.0"\} (\S+)', metrics)[1])
    total = float(re.search(r"fedinfer_batch_size_count (\S+)", metrics)[1])
    assert big["outputs"][0]["shape"][0] == rows
    predicted = {o["name"]: o["data"] for o in big["outputs"]}["predicted_class"]
    assert predicted[-3:] == {o["name"]: o["data"] for o in small["outputs"]}["predicted_class"]
    assert within == total  # no forward pass was larger than --max-batch-size


# ---------------------------------------------------------------------- 7: version policy
def test_an_old_version_is_not_loaded_because_a_request_asked(site) -> None:
    url, _ = site
    with httpx.Client(base_url=url) as client:
        old = client.post("/v2/models/digits/versions/1/infer", json=_body())
        ready = client.get("/v2/models/digits/versions/1/ready")
        current = client.post("/v2/models/digits/versions/3/infer", json=_body())
    assert old.status_code == 404 and "not served" in old.json()["error"]
    assert ready.status_code == 404
    assert current.status_code == 200


# -------------------------------------------------------- 4, 5: connections held by one
def test_pipelining_without_reading_replies_keeps_memory_bounded(site) -> None:
    url, _ = site
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    before = _rss_mb()
    with socket.create_connection(_host_port(url), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
        sock.settimeout(0.5)
        sent = 0
        chunk = request * 2000
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
            except TimeoutError:
                break  # the server stopped reading: that is the bound at work
        grown = _rss_mb() - before
    assert sent > 0
    assert grown < 150, f"RSS grew {grown:.0f} MB while {sent / len(request):.0f} requests queued"
    _assert_ready(url)


def test_silent_and_dribbling_connections_are_closed(site) -> None:
    url, _ = site
    with (
        socket.create_connection(_host_port(url), timeout=30) as silent,
        socket.create_connection(_host_port(url), timeout=30) as dribbling,
    ):
        dribbling.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n")
        assert silent.recv(1024) == b""  # closed by the header timeout
        assert dribbling.recv(1024) == b""
    _assert_ready(url)


def test_a_body_that_never_arrives_is_answered_408(site) -> None:
    url, _ = site
    with socket.create_connection(_host_port(url), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inputs"'
        )
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408")
    _assert_ready(url)


def test_connections_beyond_the_limit_get_503_not_a_reset(tmp_path: Path) -> None:
    store = publish_versions(tmp_path, generate_signing_key(), [1])
    options = options_for(store.root, limit_concurrency=4, header_timeout_s=30)
    with running_server(options) as url:
        held = [socket.create_connection(_host_port(url), timeout=10) for _ in range(4)]
        try:
            time.sleep(0.2)  # let the server accept them
            with httpx.Client(base_url=url) as client:
                refused = client.get("/v2/health/live")
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        _assert_ready(url)
    assert refused.status_code == 503


# ------------------------------------------------------------- 3, 8: control and logins
@pytest.fixture()
def secured(tmp_path: Path) -> Iterator[tuple[str, str, object]]:
    store = publish_versions(tmp_path, generate_signing_key(), [1, 2])
    tokens = tmp_path / "tokens.json"
    admin = add_token(tokens, principal="ops", roles=["admin"])
    # 3 failures a minute: a refill every 20 s, far slower than the test's requests
    options = options_for(store.root, auth_tokens=tokens, login_failures_per_min=3)
    with running_server(options) as url:
        yield url, admin, store


def test_anonymous_callers_may_infer_but_never_roll_back(site) -> None:
    url, store = site
    with httpx.Client(base_url=url) as client:
        rollback = client.post("/v2/repository/models/digits/rollback", json={"version": 1})
        infer = client.post("/v2/models/digits/infer", json=_body())
    assert rollback.status_code == 403 and "--auth-tokens" in rollback.json()["error"]
    assert infer.status_code == 200
    assert store.current_version() == 3


def test_a_deeply_nested_rollback_body_is_400(secured) -> None:
    url, admin, _ = secured
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as client:
        resp = client.post("/v2/repository/models/digits/rollback", content=b"[" * 100_000)
    assert resp.status_code == 400


def test_a_rollback_to_a_damaged_version_names_no_path(secured, tmp_path: Path) -> None:
    url, admin, store = secured
    weights = next(store.path(1).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as client:
        resp = client.post("/v2/repository/models/digits/rollback", json={"version": 1})
    assert resp.status_code == 409 and "integrity" in resp.json()["error"]
    assert str(tmp_path) not in resp.text and ".safetensors" not in resp.text


def test_failed_logins_are_rate_limited_by_address(secured) -> None:
    url, admin, _ = secured
    with httpx.Client(base_url=url) as client:
        wrong = [
            client.post(
                "/v2/models/digits/infer", json=_body(), headers={"Authorization": f"Bearer fi_{i}"}
            )
            for i in range(12)
        ]
        # even the right token waits: the address is throttled before any token is looked at
        right = client.post(
            "/v2/models/digits/infer", json=_body(), headers={"Authorization": f"Bearer {admin}"}
        )
    codes = [r.status_code for r in wrong]
    assert codes == [401] * 3 + [429] * 9
    assert int(wrong[-1].headers["retry-after"]) >= 1
    assert right.status_code == 429


def test_a_network_bind_without_tls_and_tokens_is_refused(tmp_path: Path) -> None:
    store = publish_versions(tmp_path, generate_signing_key(), [1])
    with pytest.raises(ConfigError, match="--insecure"):
        build_app(options_for(store.root, host="0.0.0.0"))
    build_app(options_for(store.root, host="0.0.0.0", insecure=True))  # explicitly accepted


# --------------------------------------------------------------------------- 14: TLS
def test_tls_refuses_old_versions_and_cbc_suites(tmp_path: Path) -> None:
    from test_serving_security import _self_signed

    store = publish_versions(tmp_path, generate_signing_key(), [1])
    certfile, keyfile = _self_signed(tmp_path)
    options = options_for(store.root, tls_certfile=certfile, tls_keyfile=keyfile)
    with running_server(options) as url:
        host, port = _host_port(url)

        def handshake(ctx: ssl.SSLContext) -> str | None:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            try:
                with (
                    socket.create_connection((host, port), timeout=10) as raw,
                    ctx.wrap_socket(raw) as tls,
                ):
                    return tls.version()
            except (ssl.SSLError, ConnectionError):
                return None

        cbc = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cbc.maximum_version = ssl.TLSVersion.TLSv1_2
        cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256")  # CBC: Python's default server list has it
        modern = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        modern.maximum_version = ssl.TLSVersion.TLSv1_2
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point here
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
            assert handshake(old) is None
        assert handshake(cbc) is None
        assert handshake(modern) == "TLSv1.2"


# ------------------------------------------------- 5: the store watcher survives EMFILE
def test_hot_swap_resumes_after_the_process_ran_out_of_file_descriptors(tmp_path: Path) -> None:
    """A flood of connections at a low fd limit makes the new version's load fail with
    EMFILE; once the flood ends the server must still swap to it."""
    import resource

    from artifact_factory import make_artifact

    from fedinfer.serving.launch import SiteServer

    key = generate_signing_key()
    store = publish_versions(tmp_path, key, [1], keep=5)
    log = tmp_path / "serve.log"
    args = ["--poll-interval", "0.05", "--header-timeout", "120", "--limit-concurrency", "4096"]
    with SiteServer(store.root, extra_args=args, log_file=log) as server:
        assert server.pid is not None
        in_use = len(list(Path(f"/proc/{server.pid}/fd").iterdir()))
        soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (in_use + 4, hard))
        flood = []
        try:
            for _ in range(32):  # every descriptor the server has left, and more
                flood.append(socket.create_connection(_host_port(server.url), timeout=10))
            art = make_artifact(tmp_path / "v2", key, version=2)
            store.publish(art, public_key=key.public_key())
            deadline = time.monotonic() + 60
            while "Too many open files" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "Too many open files" in log.read_text()
        finally:
            for sock in flood:
                sock.close()
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
        served = None
        with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
            deadline = time.monotonic() + 60
            while served != "2" and time.monotonic() < deadline:
                answer = client.post("/v2/models/digits/infer", json=_body())
                served = answer.json()["model_version"]
                time.sleep(0.1)
    assert served == "2"


def test_a_load_that_failed_once_with_emfile_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store turns EMFILE into ModelIntegrityError('cannot read ...: Too many open
    files'); a version whose load failed that way used to be skipped until the store moved
    on, so hot swap stopped for good. The failure is injected exactly once here."""
    from artifact_factory import make_artifact

    from fedinfer.artifacts import ModelStore
    from fedinfer.errors import ModelIntegrityError

    key = generate_signing_key()
    store = publish_versions(tmp_path, key, [1])
    real_read = ModelStore._read
    failures = []

    def read_once_out_of_fds(self: ModelStore, version: int, file_name: str) -> bytes:
        if version == 2 and not failures:
            failures.append(file_name)
            path = self.path(version) / file_name
            raise ModelIntegrityError(f"cannot read {path}: Too many open files")
        return real_read(self, version, file_name)

    monkeypatch.setattr(ModelStore, "_read", read_once_out_of_fds)
    with running_server(options_for(store.root)) as url, httpx.Client(base_url=url) as client:
        store.publish(make_artifact(tmp_path / "v2", key, version=2), public_key=key.public_key())
        served, deadline = None, time.monotonic() + 60
        while served != "2" and time.monotonic() < deadline:
            served = client.post("/v2/models/digits/infer", json=_body()).json()["model_version"]
            time.sleep(0.05)
    assert failures and served == "2"


# ------------------------------------------------------------ the corpus, one server
def _corpus() -> list[tuple[str, str, dict[str, str], bytes]]:
    """Malformed requests: every field of a valid body replaced by every wrong type, plus
    protocol-level oddities. (method, path, headers, body)."""
    good = _body()
    tensor = good["inputs"][0]  # type: ignore[index]
    wrong_values: list[object] = [None, True, 0, -1, 1.5, "", "x", [], [None], {}, [[1]], 2**70]
    cases: list[tuple[str, str, dict[str, str], bytes]] = []
    infer = "/v2/models/digits/infer"
    for key in ("name", "shape", "datatype", "data", "parameters"):
        for value in wrong_values:
            changed = {"inputs": [{**tensor, key: value}]}
            cases.append(("POST", infer, {}, json.dumps(changed).encode()))
        missing = {"inputs": [{k: v for k, v in tensor.items() if k != key}]}
        cases.append(("POST", infer, {}, json.dumps(missing).encode()))
    for value in wrong_values:
        cases.append(("POST", infer, {}, json.dumps({**good, "outputs": value}).encode()))
        cases.append(("POST", infer, {}, json.dumps({**good, "id": value}).encode()))
        cases.append(("POST", infer, {}, json.dumps({"inputs": value}).encode()))
    announced = {**tensor, "data": None, "parameters": {"binary_data_size": 160}}
    binary = json.dumps({"inputs": [announced]}).encode()
    for length in ("-1", "0", "abc", "99999999", "1e3", str(len(binary) + 1)):
        header = {"inference-header-content-length": length}
        cases.append(("POST", infer, header, binary + b"\0" * 8))
    cases += [
        ("POST", infer, {}, b"[" * 50_000),
        ("POST", infer, {}, b'{"inputs": ' + b"[" * 50_000),
        ("POST", infer, {}, b"\xff\xfe\x00"),
        ("POST", infer, {}, b""),
        ("POST", infer, {"content-type": "text/plain"}, b"hello"),
        ("POST", infer, {}, json.dumps(_body(rows=1, data=[[0.0] * INPUT_DIM])).encode()),
        *[
            ("POST", infer, {}, json.dumps({"inputs": [{**tensor, "shape": shape}]}).encode())
            for shape in ([1, INPUT_DIM, 1], [2**31, 2**31], [-1, INPUT_DIM], [1, 2**40])
        ],
        ("POST", "/v2/models/digits/versions/-1/infer", {}, b"{}"),
        ("POST", "/v2/models/digits/versions/1e3/infer", {}, b"{}"),
        ("POST", "/v2/models/digits/versions/9999999999999/infer", {}, b"{}"),
        ("POST", "/v2/models/%00/infer", {}, b"{}"),
        ("POST", "/v2/models/digits/infer/../../health/ready", {}, b"{}"),
        ("DELETE", infer, {}, b""),
        ("GET", "/v2/repository/models/digits/rollback", {}, b""),
        ("POST", "/v2/repository/models/digits/rollback", {}, b'{"version": 1}'),
        ("POST", infer, {"authorization": "Bearer " + "x" * 5000}, json.dumps(good).encode()),
        ("POST", infer, {"x-request-id": "a b" * 100}, json.dumps(good).encode()),
    ]
    return cases


def test_a_bad_input_corpus_never_gets_a_5xx_or_grows_memory(site) -> None:
    url, _ = site
    corpus = _corpus()
    before = _rss_mb()
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for method, path, headers, body in corpus:
            resp = client.request(method, path, headers=headers, content=body)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, (method, path, body[:200], resp.text)
            assert client.get("/v2/health/ready").status_code == 200
    grown = _rss_mb() - before
    # the few 200s are valid variants (an empty "parameters", "id": "x", nested data...)
    assert len(corpus) > 100 and statuses.get(200, 0) <= 12
    assert grown < 100, f"RSS grew {grown:.0f} MB over {len(corpus)} bad requests"


def test_limit_concurrency_stays_below_the_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the fd limit clients are reset and the store unreadable: keep 64 spare."""
    import resource

    from fedinfer.serving.server import _fd_capped

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 4096))
    assert _fd_capped(512) == 192 and _fd_capped(100) == 100
