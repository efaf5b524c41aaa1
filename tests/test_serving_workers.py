"""`fedinfer serve --workers N`: real worker processes on one port, over real sockets.

Every test starts the real parent (`python -m fedinfer.serving serve --workers 2`) through
SiteServer; workers are told apart by the `x-fedinfer-worker` header and found as the
parent's child processes in /proc.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from artifact_factory import INPUT_DIM, make_artifact, publish_versions
from test_serving_security import _self_signed

from fedinfer.artifacts import ModelStore, generate_signing_key
from fedinfer.crypto.at_rest import StateKey
from fedinfer.errors import ServingError
from fedinfer.serving.audit import summarize_audit
from fedinfer.serving.auth import add_token
from fedinfer.serving.launch import SiteServer

pytestmark = pytest.mark.skipif(not os.uname().sysname == "Linux", reason="SO_REUSEPORT, /proc")

BODY = {
    "inputs": [
        {"name": "input", "shape": [1, INPUT_DIM], "datatype": "FP32", "data": [0.0] * INPUT_DIM}
    ]
}
INFER = "/v2/models/digits/infer"


def _children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _gone(pid: int) -> bool:
    """The process exited and its parent reaped it (a zombie leader's other threads may
    still hold its sockets, so "Z" is not gone yet)."""
    return not Path(f"/proc/{pid}").exists()


def _metrics_dir(worker: int) -> Path:
    """The shared Prometheus directory, from a worker's environment."""
    environ = Path(f"/proc/{worker}/environ").read_text().split("\0")
    shared = next(v for v in environ if v.startswith("PROMETHEUS_MULTIPROC_DIR="))
    return Path(shared.partition("=")[2])


def _exited(pid: int) -> bool:
    """Gone, or a zombie that no one reaps (an orphan in a container without an init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def _wait(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _infer_fresh(url: str, **kwargs) -> httpx.Response:
    """One request on a new connection (SO_REUSEPORT picks a worker per connection)."""
    with httpx.Client(base_url=url, trust_env=False, **kwargs) as client:
        return client.post(INFER, json=BODY)


def _metric(url: str, line_start: str, **kwargs) -> float:
    with httpx.Client(base_url=url, trust_env=False, **kwargs) as client:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(line_start):
                return float(line.split()[-1])
    return 0.0


def test_two_workers_share_port_tls_tokens_audit_and_metrics(tmp_path: Path) -> None:
    """Concurrent requests over TLS with a token: both workers answer, the audit log holds
    exactly one whole JSON line per request, /metrics sums both workers, and SIGTERM
    leaves no worker, no metrics directory and a free port behind."""
    # Prepare
    store = publish_versions(tmp_path, generate_signing_key(), [1])
    certfile, keyfile = _self_signed(tmp_path)
    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, principal="clinic-a", roles=["infer"])
    trust = ssl.create_default_context(cafile=str(certfile))
    auth = {"Authorization": f"Bearer {token}"}
    ids = [f"req-{i}" for i in range(160)]
    server = SiteServer(store.root, backend="torch", workers=2, auth_tokens=tokens,
                        tls_certfile=certfile, tls_keyfile=keyfile)  # fmt: skip

    def call(request_id: str) -> tuple[int, str | None]:
        with httpx.Client(base_url=server.url, verify=trust, trust_env=False) as client:
            resp = client.post(INFER, json=BODY, headers={**auth, "x-request-id": request_id})
        return resp.status_code, resp.headers.get("x-fedinfer-worker")

    # Execute
    with server:
        pids = _children(server.pid or 0)
        metrics_dir = _metrics_dir(min(pids))
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(call, ids))
        no_token = _infer_fresh(server.url, verify=trust)
        served = "fedinfer_requests_total{endpoint=\"infer\",status=\"200\"}"
        _wait(lambda: _metric(server.url, served, verify=trust) == len(ids), "metrics")
        totals = {_metric(server.url, served, verify=trust) for _ in range(10)}
        port = server.port
    # Assert
    assert {status for status, _ in answers} == {200} and no_token.status_code == 401
    assert {worker for _, worker in answers} == {"0", "1"}
    assert len(pids) == 2 and totals == {float(len(ids))}  # whichever worker answers
    lines = (tmp_path / "audit" / "audit.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = [json.loads(line) for line in lines[:-1]]  # every line whole JSON
    assert sorted(r["request_id"] for r in records if r["status"] == 200) == sorted(ids)
    assert [r["status"] for r in records if r["endpoint"] == "infer"].count(401) == 1
    assert all(_gone(pid) for pid in pids) and not metrics_dir.exists()
    with socket.socket() as probe:  # nothing holds the port any more
        probe.bind(("127.0.0.1", port))


def test_encrypted_audit_log_of_two_workers_is_one_authenticated_chain(tmp_path: Path) -> None:
    """The parent is the only writer: sealed lines of both workers verify in order."""
    # Prepare
    key = StateKey.generate()
    key_file = key.save(tmp_path / "keys" / "site.key")
    signing = generate_signing_key()
    store = ModelStore(tmp_path / "site" / "models", key=key)
    store.publish(make_artifact(tmp_path / "v1", signing), public_key=signing.public_key())
    # Execute
    with SiteServer(store.root, backend="torch", workers=2,
                    extra_args=["--state-key", str(key_file)]) as server:  # fmt: skip
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda _: _infer_fresh(server.url), range(60)))
    usage = summarize_audit(tmp_path / "site" / "audit", key=key)  # raises on a bad line
    # Assert
    assert {a.status_code for a in answers} == {200}
    assert {a.headers["x-fedinfer-worker"] for a in answers} == {"0", "1"}
    assert [(u.principal, u.requests) for u in usage] == [("anonymous", 60)]


def test_hot_swap_reaches_every_worker_and_ctrl_c_stops_them(tmp_path: Path) -> None:
    # Prepare
    key = generate_signing_key()
    store = publish_versions(tmp_path, key, [1])
    with SiteServer(store.root, backend="torch", workers=2,
                    extra_args=["--poll-interval", "0.1"]) as server:  # fmt: skip
        pids = _children(server.pid or 0)
        # Execute
        store.publish(make_artifact(tmp_path / "v2", key, version=2), public_key=key.public_key())
        swapped: set[str] = set()

        def every_worker_serves_v2() -> bool:
            resp = _infer_fresh(server.url)
            assert resp.status_code == 200
            if resp.headers["x-model-version"] == "2":
                swapped.add(resp.headers["x-fedinfer-worker"])
            return swapped == {"0", "1"}

        _wait(every_worker_serves_v2, "both workers to serve version 2")
        after = [_infer_fresh(server.url).headers["x-model-version"] for _ in range(20)]
        # Ctrl-C reaches the parent (and, from a terminal, the workers: both must cope)
        assert server.process is not None
        os.kill(server.pid or 0, signal.SIGINT)
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        code = server.process.wait(timeout=60)
    # Assert
    assert after == ["2"] * 20
    assert code == 0 and all(_gone(pid) for pid in pids)


def test_a_killed_worker_is_replaced_while_the_other_keeps_answering(tmp_path: Path) -> None:
    # Prepare
    store = publish_versions(tmp_path, generate_signing_key(), [1])
    log = tmp_path / "serve.log"
    with SiteServer(store.root, backend="torch", workers=2, log_file=log) as server:
        parent = server.pid or 0
        first = _children(parent)
        victim = min(first)
        # Execute
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: _gone(victim), "the killed worker to exit")
        during = [_infer_fresh(server.url) for _ in range(40)]
        _wait(lambda: len(_children(parent) - first) == 1, "a new worker process")
        workers_after: set[str] = set()
        _wait(
            lambda: workers_after.add(_infer_fresh(server.url).headers["x-fedinfer-worker"])
            or workers_after == {"0", "1"},
            "the new worker to answer",
        )
        replacement = _children(parent) - first
        workers = _children(parent)
        metrics_dir = _metrics_dir(min(workers))
        os.kill(parent, signal.SIGKILL)  # a parent killed outright takes its workers along
        _wait(lambda: all(_exited(pid) for pid in workers), "the workers to follow the parent")
    # the next server removes the metrics directory the killed one left behind
    _wait(lambda: _gone(parent), "the killed parent to be reaped")
    with SiteServer(store.root, backend="torch", workers=2):
        left_behind = metrics_dir.exists()
    # Assert
    assert {r.status_code for r in during} == {200}
    assert len({r.headers["x-fedinfer-worker"] for r in during}) == 1  # the survivor only
    assert len(replacement) == 1 and victim not in replacement and not left_behind
    assert "exited with code -9; starting a new one" in log.read_text()
    lines = (tmp_path / "audit" / "audit.jsonl").read_bytes().split(b"\n")
    assert all(isinstance(json.loads(line), dict) for line in lines[:-1])


def test_a_worker_that_cannot_start_stops_the_server_with_one_error(tmp_path: Path) -> None:
    # Prepare: the current version is corrupted, so every worker fails its startup
    store = publish_versions(tmp_path, generate_signing_key(), [1])
    blob = store.path(1) / "weights.safetensors"
    blob.write_bytes(b"\x00" + blob.read_bytes()[1:])
    server = SiteServer(store.root, backend="torch", workers=2)
    # Execute
    with pytest.raises(ServingError, match="exited with code 2"):
        server.start()
    # Assert
    text = server.log_file.read_text()
    assert "before it served; see the log above" in text
    assert "do not match the signed sha256" in text


@pytest.mark.parametrize("workers", ["0", "65"], ids=["zero", "too-many"])
def test_workers_out_of_range_is_exit_code_2(tmp_path: Path, capsys, workers: str) -> None:
    from fedinfer.serving.__main__ import main

    (tmp_path / "models").mkdir()
    code = main(["serve", "--model-store", str(tmp_path / "models"), "--workers", workers])
    err = capsys.readouterr().err
    assert code == 2 and "`--workers` must be in 1..64" in err


def test_a_port_another_reuseport_listener_holds_is_refused(tmp_path: Path, capsys) -> None:
    """Another process of this user listening with SO_REUSEPORT must not silently receive a
    share of the site's connections: the server refuses the port instead of joining it."""
    from fedinfer.serving.__main__ import main

    # Prepare
    store = publish_versions(tmp_path, generate_signing_key(), [1])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        # Execute
        code = main(["serve", "--model-store", str(store.root), "--workers", "2",
                     "--port", str(port), "--backend", "torch"])  # fmt: skip
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and f"cannot bind 127.0.0.1:{port}" in err and "--port" in err


def test_the_simulation_serving_stage_passes_serving_workers(tmp_path: Path) -> None:
    """`serving.workers=2`: the end-of-run demo server of a site runs two workers."""
    from conftest import tiny_config
    from rich.console import Console

    from fedinfer.artifacts import save_public_key
    from fedinfer.simulation.serve_demo import site_servers

    # Prepare: a finished run's layout with one site holding a signed model
    cfg = tiny_config("serving.workers=2", "serving.backend=torch")
    key = generate_signing_key()
    (tmp_path / "coordinator").mkdir()
    save_public_key(key, tmp_path / "coordinator" / "signing.pub")
    store = ModelStore(tmp_path / "sites" / "site-00" / "models")
    artifact = make_artifact(tmp_path / "v1", key, name=cfg.model.name)
    store.publish(artifact, public_key=key.public_key())
    # Execute
    with site_servers(cfg, output_dir=tmp_path, console=Console(quiet=True)) as answers:
        workers = set()
        for _ in range(40):  # a new connection each: SO_REUSEPORT spreads them
            with httpx.Client(base_url=answers[0].url, trust_env=False) as client:
                resp = client.post(f"/v2/models/{cfg.model.name}/infer", json=BODY)
            workers.add(resp.headers.get("x-fedinfer-worker"))
    # Assert
    assert [a.site_id for a in answers] == ["site-00"] and answers[0].model_version == "1"
    assert workers == {"0", "1"}


def test_every_serve_option_reaches_the_workers_unchanged(tmp_path: Path) -> None:
    """Workers get the parent's ServeOptions as JSON: every field must survive the trip."""
    from fedinfer.serving.server import ServeOptions
    from fedinfer.serving.workers import _options_from_json, _options_to_json

    options = ServeOptions(
        model_store=tmp_path / "models", port=0, tls_certfile=tmp_path / "c.pem",
        tls_keyfile=tmp_path / "k.pem", auth_tokens=tmp_path / "t.json", rate_burst=3.0,
        pin_versions=(3, 5), threads=None, workers=2, state_key=tmp_path / "site.key",
    )  # fmt: skip
    wire = json.loads(json.dumps(_options_to_json(options)))
    assert _options_from_json(wire) == options


def test_workers_above_one_need_linux(tmp_path: Path, monkeypatch) -> None:
    from fedinfer.errors import ConfigError
    from fedinfer.serving.server import ServeOptions

    monkeypatch.setattr("sys.platform", "darwin")
    with pytest.raises(ConfigError, match="`--workers` above 1 needs Linux"):
        ServeOptions(model_store=tmp_path, workers=2).validate()
    ServeOptions(model_store=tmp_path, workers=1).validate()  # one process: any platform
