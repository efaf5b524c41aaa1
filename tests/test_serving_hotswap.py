"""Hot swap under concurrent load, rollback (CLI, admin endpoint), and load failures."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from artifact_factory import INPUT_DIM, make_artifact, publish_versions
from serving_harness import options_for, running_server

from fedinfer.artifacts import generate_signing_key, load_torch_model
from fedinfer.cli import main as cli_main
from fedinfer.serving.auth import add_token


def _logits(store, version: int, x: np.ndarray) -> np.ndarray:
    weights, manifest = store.load(version)
    with torch.inference_mode():
        return load_torch_model(weights, manifest)(torch.from_numpy(x)).numpy()


def _request(x: np.ndarray) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "logits"}],
    }


def _wait_for_version(client: httpx.Client, version: int, x: np.ndarray) -> None:
    for _ in range(400):
        if client.post("/v2/models/digits/infer", json=_request(x)).json()["model_version"] == str(
            version
        ):
            return
        time.sleep(0.025)
    raise TimeoutError(f"server never switched to version {version}")


def test_hot_swap_under_load_fails_nothing_and_never_mixes_versions(tmp_path: Path) -> None:
    # Prepare
    key = generate_signing_key()
    store = publish_versions(tmp_path, key, [1])
    x = np.random.default_rng(0).normal(size=(2, INPUT_DIM)).astype(np.float32)
    responses: list[tuple[int, str, np.ndarray]] = []
    stop = threading.Event()

    def client_loop(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                resp = client.post("/v2/models/digits/infer", json=_request(x))
                body = resp.json()
                logits = (
                    np.array(body["outputs"][0]["data"], np.float32).reshape(2, -1)
                    if resp.status_code == 200
                    else np.empty(0)
                )
                responses.append((resp.status_code, body.get("model_version", ""), logits))

    with running_server(options_for(store.root, max_batch_size=16)) as url:
        threads = [threading.Thread(target=client_loop, args=(url,)) for _ in range(4)]
        for t in threads:
            t.start()
        # Execute: three publishes and a rollback while the clients hammer the server
        with httpx.Client(base_url=url) as probe:
            for version in (2, 3, 4):
                art = make_artifact(tmp_path / f"new{version}", key, version=version)
                store.publish(art, public_key=key.public_key())
                _wait_for_version(probe, version, x)
            store.rollback(to=3)
            _wait_for_version(probe, 3, x)
        stop.set()
        for t in threads:
            t.join()
    # Assert
    assert responses and all(status == 200 for status, _, _ in responses)
    served = {version for _, version, _ in responses}
    assert {"1", "4", "3"} <= served
    expected = {v: _logits(store, v, x) for v in (1, 2, 3, 4)}
    for _, version, logits in responses:  # each answer is exactly what its version computes
        np.testing.assert_allclose(logits, expected[int(version)], rtol=1e-5, atol=1e-6)


def test_rollback_via_cli_and_admin_endpoint(tmp_path: Path, capsys) -> None:
    # Prepare
    store = publish_versions(tmp_path, generate_signing_key(), [1, 2, 3])
    tokens = tmp_path / "tokens.json"
    admin_token = add_token(tokens, principal="ops", roles=["admin"])
    x = np.zeros((1, INPUT_DIM), dtype=np.float32)
    options = options_for(store.root, auth_tokens=tokens)
    auth = {"Authorization": f"Bearer {admin_token}"}
    with running_server(options) as url, httpx.Client(base_url=url, headers=auth) as client:
        # Execute
        code = cli_main(["models", "rollback", "--model-store", str(store.root)])
        _wait_for_version(client, 2, x)
        admin = client.post("/v2/repository/models/digits/rollback", json={"version": 1})
        after_admin = client.post("/v2/models/digits/infer", json=_request(x)).json()
        refused = client.post("/v2/repository/models/digits/rollback", json={"version": 7})
    # Assert
    assert code == 0 and "current version 3 -> 2" in capsys.readouterr().out
    assert admin.status_code == 200 and admin.json()["model_version"] == "1"
    assert after_admin["model_version"] == "1"  # the admin endpoint swaps before answering
    assert refused.status_code == 409 and "no such stored version" in refused.json()["error"]
    assert str(tmp_path) not in refused.text  # paths go to the log, not to clients
    assert store.current_version() == 1


def test_a_version_corrupted_on_disk_is_not_swapped_in(tmp_path: Path) -> None:
    """If the new current's weights fail their hash at load, the server keeps the old one."""
    # Prepare
    key = generate_signing_key()
    store = publish_versions(tmp_path, key, [1])
    x = np.zeros((1, INPUT_DIM), dtype=np.float32)
    with running_server(options_for(store.root)) as url, httpx.Client(base_url=url) as client:
        art = make_artifact(tmp_path / "v2", key, version=2)
        store.publish(art, public_key=key.public_key(), make_current=False)
        blob = store.path(2) / "weights.safetensors"
        blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
        # Execute
        store._switch(2)  # what a crash-free but disk-corrupted site would present
        for _ in range(10):
            time.sleep(0.05)
            resp = client.post("/v2/models/digits/infer", json=_request(x))
            assert resp.status_code == 200 and resp.json()["model_version"] == "1"
        metrics = client.get("/metrics").text
    # Assert
    assert "fedinfer_model_load_failures_total 1.0" in metrics
