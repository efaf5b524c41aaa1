"""SiteServer: `python -m fedinfer serve` in a real subprocess on a free loopback port."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from artifact_factory import INPUT_DIM, make_artifact, publish_versions

from fedinfer.artifacts import ModelStore, generate_signing_key, save_public_key
from fedinfer.errors import ServingError
from fedinfer.serving.launch import SiteServer


def test_site_server_subprocess_serves_and_terminates_cleanly(tmp_path: Path) -> None:
    # Prepare
    key = generate_signing_key()
    store = publish_versions(tmp_path, key, [1])
    save_public_key(key, tmp_path / "coordinator.pub")
    x = np.ones((2, INPUT_DIM), dtype=np.float32)
    # Execute
    with SiteServer(store.root, public_key=tmp_path / "coordinator.pub", backend="onnx") as server:
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        inp = triton.InferInput("input", [2, INPUT_DIM], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("digits", [inp])
        client.close()
        # a new version published while the subprocess serves is picked up
        store.publish(make_artifact(tmp_path / "v2", key, version=2), public_key=key.public_key())
        with httpx.Client(base_url=server.url) as http:
            for _ in range(600):  # the swap loads and warms (ONNX export) in the background
                meta = http.get("/v2/models/digits").json()
                if meta["parameters"]["current_version"] == 2:
                    break
                time.sleep(0.1)
        process = server.process
    # Assert
    assert server.port > 0 and server.url.startswith("http://127.0.0.1:")
    assert result.get_response()["model_version"] == "1"
    assert result.as_numpy("logits").shape == (2, 10)
    assert meta["parameters"]["current_version"] == 2
    # SIGTERM -> graceful drain; uvicorn then re-raises the signal, hence -SIGTERM
    assert process is not None and process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
    assert (tmp_path / "audit" / "audit.jsonl").exists()


def test_site_server_reports_a_server_that_cannot_start(tmp_path: Path) -> None:
    # Prepare: the store's current version is corrupted, so startup must fail
    key = generate_signing_key()
    store = publish_versions(tmp_path, key, [1])
    blob = store.path(1) / "weights.safetensors"
    blob.write_bytes(b"\x00" + blob.read_bytes()[1:])
    # Execute / Assert
    with pytest.raises(ServingError, match="exited with code"):
        with SiteServer(store.root, backend="torch", startup_timeout_s=60):
            pass
    assert "do not match the signed sha256" in (tmp_path / "serve.log").read_text()


def test_cli_serve_refuses_a_foreign_signature_at_startup(tmp_path: Path) -> None:
    """--public-key re-verifies: a store signed by someone else is never served."""
    store = publish_versions(tmp_path, generate_signing_key(), [1])
    save_public_key(generate_signing_key(), tmp_path / "other.pub")
    with pytest.raises(ServingError, match="exited"):
        with SiteServer(
            ModelStore(store.root).root, public_key=tmp_path / "other.pub", backend="torch"
        ):
            pass
    assert "not the key this store is pinned to" in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-certfile", "c.pem"], "go together"),
        (["--max-batch-size", "0"], "must be >= 1"),
        (["--nonfinite", "reject", "--max-body-bytes", "10"], "max-body-bytes"),
    ],
    ids=["tls-half", "batch-0", "tiny-body"],
)
def test_serve_rejects_bad_options_with_exit_code_2(
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    from fedinfer.serving.__main__ import main

    code = main(["serve", "--model-store", str(tmp_path / "models"), "--port", "0", *args])
    assert code == 2 and message in capsys.readouterr().err


# ------------------------------------------------ issue 14 item 3: serve says what it does
def test_serve_prints_its_url_model_and_version(tmp_path: Path) -> None:
    store = publish_versions(tmp_path, generate_signing_key(), [1, 2])
    log = tmp_path / "serve.log"
    with SiteServer(store.root, log_file=log, backend="torch") as server:
        text = log.read_text()
    infer_url = f"{server.url}/v2/models/digits/infer"
    assert f"listening on {server.url}" in text
    assert f"serving model 'digits' version 2 (torch backend): POST {infer_url}" in text


def test_serve_warns_on_an_empty_store_and_refuses_a_missing_one(tmp_path: Path, capsys) -> None:
    import subprocess
    import sys

    from fedinfer.serving.__main__ import main

    # a missing store (a typo): refused with exit 2 and one line naming the option
    code = main(["serve", "--model-store", str(tmp_path / "modles"), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "`--model-store`" in err and "does not exist" in err
    # an empty store (nothing published yet): starts, says so
    (tmp_path / "models").mkdir()
    cmd = [sys.executable, "-m", "fedinfer.serving", "serve", "--model-store",
           str(tmp_path / "models"), "--port", "0"]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:  # the server keeps running: read until the warning
                lines.append(line)
                if "WARNING" in line and "holds no model yet" in line:
                    break
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert any("listening on http://127.0.0.1:" in line for line in lines)
    assert any("answers 503 until a version is published" in line for line in lines)
