"""The inference server over a real socket: OIP endpoints (httpx + tritonclient), bad input,
metrics and audit."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from artifact_factory import INPUT_DIM, NUM_CLASSES, publish_versions
from serving_harness import options_for, running_server
from tritonclient.utils import InferenceServerException

from fedinfer.artifacts import generate_signing_key, load_torch_model


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("site")
    store = publish_versions(root, generate_signing_key(), [1, 2])
    options = options_for(store.root, max_body_bytes=1024 * 1024, pin_versions=(1,))
    with running_server(options) as url:
        yield url, store


def _reference(store, version: int, x: np.ndarray) -> np.ndarray:
    weights, manifest = store.load(version)
    with torch.inference_mode():
        return load_torch_model(weights, manifest)(torch.from_numpy(x)).numpy()


def _json_infer(x: np.ndarray, **extra: object) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
        **extra,
    }


def test_health_and_server_metadata(site) -> None:
    url, _ = site
    with httpx.Client(base_url=url) as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]


def test_model_metadata_lists_all_versions_and_specs(site) -> None:
    # Execute
    url, _ = site
    with httpx.Client(base_url=url) as client:
        current = client.get("/v2/models/digits").json()
        pinned = client.get("/v2/models/digits/versions/1").json()
        ready = client.get("/v2/models/digits/versions/1/ready")
    # Assert
    assert current["versions"] == ["1", "2"] and current["parameters"]["version"] == 2
    assert current["inputs"] == [{"name": "input", "shape": [-1, INPUT_DIM], "datatype": "FP32"}]
    assert [o["name"] for o in current["outputs"]] == ["logits", "probabilities", "predicted_class"]
    assert pinned["parameters"]["version"] == 1 and pinned["parameters"]["server_round"] == 1
    assert ready.status_code == 200


def test_json_infer_with_httpx_matches_the_model(site) -> None:
    # Prepare
    url, store = site
    x = np.random.default_rng(0).normal(size=(4, INPUT_DIM)).astype(np.float32)
    # Execute
    with httpx.Client(base_url=url) as client:
        resp = client.post(
            "/v2/models/digits/infer",
            json=_json_infer(x, id="req-7"),
            headers={"X-Request-ID": "trace-1"},
        )
    # Assert
    body = resp.json()
    assert resp.status_code == 200 and body["model_version"] == "2" and body["id"] == "req-7"
    assert resp.headers["x-request-id"] == "trace-1" and resp.headers["x-model-version"] == "2"
    outputs = {o["name"]: o for o in body["outputs"]}
    logits = np.array(outputs["logits"]["data"], dtype=np.float32).reshape(4, NUM_CLASSES)
    np.testing.assert_allclose(logits, _reference(store, 2, x), rtol=1e-5, atol=1e-6)
    assert outputs["predicted_class"]["data"] == logits.argmax(1).tolist()
    assert math.isclose(sum(outputs["probabilities"]["data"][:NUM_CLASSES]), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infers_current_and_pinned_versions(site, binary: bool) -> None:
    # Prepare
    url, store = site
    x = np.random.default_rng(1).normal(size=(3, INPUT_DIM)).astype(np.float32)
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [
        triton.InferRequestedOutput("logits", binary_data=binary),
        triton.InferRequestedOutput("predicted_class", binary_data=binary),
    ]
    # Execute
    current = client.infer("digits", [inp], outputs=outs)
    pinned = client.infer("digits", [inp], model_version="1", outputs=outs)
    default_outputs = client.infer("digits", [inp])  # tritonclient asks for binary outputs
    # Assert
    assert client.is_server_ready() and client.is_model_ready("digits")
    assert client.get_model_metadata("digits")["name"] == "digits"
    assert current.get_response()["model_version"] == "2"
    assert pinned.get_response()["model_version"] == "1"
    np.testing.assert_allclose(current.as_numpy("logits"), _reference(store, 2, x), atol=1e-6)
    np.testing.assert_allclose(pinned.as_numpy("logits"), _reference(store, 1, x), atol=1e-6)
    assert pinned.as_numpy("predicted_class").dtype == np.int64
    np.testing.assert_allclose(
        default_outputs.as_numpy("probabilities").sum(axis=1), 1.0, rtol=1e-5
    )
    client.close()


def test_large_request_is_decoded_and_encoded_off_the_event_loop(site) -> None:
    """3000 rows (~0.5 MB): parsing and encoding go to a thread; the answer is still exact."""
    # Prepare
    url, store = site
    x = np.random.default_rng(3).normal(size=(3000, INPUT_DIM)).astype(np.float32)
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    # Execute
    result = client.infer("digits", [inp], outputs=[triton.InferRequestedOutput("logits")])
    client.close()
    # Assert
    np.testing.assert_allclose(
        result.as_numpy("logits"), _reference(store, 2, x), rtol=1e-5, atol=1e-5
    )


def _bad(**override: object) -> dict[str, object]:
    tensor = {
        "name": "input",
        "shape": [1, INPUT_DIM],
        "datatype": "FP32",
        "data": [0.5] * INPUT_DIM,
    }
    tensor.update(override)
    return {"inputs": [tensor]}


NAN_ROW = [0.0] * (INPUT_DIM - 1) + [float("nan")]
BAD_REQUESTS = [
    ("POST", "/v2/models/digits/infer", b"{not json", 400, "not valid JSON"),
    ("POST", "/v2/models/digits/infer", _bad(name="pixels"), 400, "unknown input"),
    ("POST", "/v2/models/digits/infer", _bad(shape=[2, INPUT_DIM // 2]), 400, "shape"),
    ("POST", "/v2/models/digits/infer", _bad(datatype="FP64"), 400, "must be FP32"),
    ("POST", "/v2/models/digits/infer", _bad(data=NAN_ROW), 400, "NaN or infinite"),
    ("POST", "/v2/models/digits/infer", _bad(data=[1e39] * INPUT_DIM), 400, "NaN or infinite"),
    ("POST", "/v2/models/digits/infer", _bad(shape=[0, INPUT_DIM], data=[]), 400, "empty batch"),
    (
        "POST",
        "/v2/models/digits/infer",
        {"inputs": [_bad()["inputs"][0]] * 2},
        400,  # type: ignore[index]
        "exactly one input",
    ),
    (
        "POST",
        "/v2/models/digits/infer",
        {**_bad(), "outputs": [{"name": "secret"}]},
        400,
        "unknown output",
    ),
    (
        "POST",
        "/v2/models/digits/infer",
        {
            "inputs": [_bad()["inputs"][0]],  # type: ignore[index]
            "pad": "x" * 1_100_000,
        },
        413,
        "exceeds",
    ),
    ("POST", "/v2/models/other/infer", _bad(), 404, "unknown model"),
    ("POST", "/v2/models/digits/versions/9/infer", _bad(), 404, "not in the model store"),
    ("POST", "/v2/models/digits/versions/latest/infer", _bad(), 404, "integers"),
    ("GET", "/v2/models/digits/infer", None, 405, "use POST"),
    ("GET", "/v2/nothing", None, 404, "no route"),
]


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "match"),
    BAD_REQUESTS,
    ids=[
        "bad-json",
        "wrong-name",
        "wrong-shape",
        "wrong-dtype",
        "nan",
        "overflow-inf",
        "empty-batch",
        "two-inputs",
        "unknown-output",
        "oversize",
        "unknown-model",
        "unknown-version",
        "non-int-version",
        "wrong-method",
        "unknown-route",
    ],
)
def test_bad_input_is_a_4xx_with_an_oip_error_body(
    site, method: str, path: str, payload: object, status: int, match: str
) -> None:
    # Prepare
    url, _ = site
    content = (
        payload
        if isinstance(payload, bytes)
        else (None if payload is None else json.dumps(payload).encode())
    )
    # Execute
    with httpx.Client(base_url=url) as client:
        resp = client.request(method, path, content=content)
        still_ok = client.post("/v2/models/digits/infer", json=_bad())
    # Assert
    assert resp.status_code == status
    assert match in resp.json()["error"]
    assert still_ok.status_code == 200


def test_tritonclient_sees_errors_as_exceptions(site) -> None:
    url, _ = site
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    inp = triton.InferInput("input", [1, 3], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("digits", [inp])
    client.close()


def test_metrics_expose_counts_latency_batches_queue_and_version(site) -> None:
    # Prepare
    url, _ = site
    with httpx.Client(base_url=url) as client:
        client.post("/v2/models/digits/infer", json=_bad())
        # Execute
        text = client.get("/metrics").text
    # Assert
    assert 'fedinfer_requests_total{endpoint="infer",status="200"}' in text
    assert "fedinfer_request_latency_seconds_bucket" in text
    assert "fedinfer_batch_size_bucket" in text
    assert "fedinfer_queue_depth" in text
    assert 'fedinfer_model_version{model="digits"} 2.0' in text


def test_audit_lines_record_requests_but_never_inputs(site) -> None:
    # Prepare
    url, store = site
    secret = 31415.9265
    x = np.full((2, INPUT_DIM), secret, dtype=np.float32)
    with httpx.Client(base_url=url) as client:
        client.post(
            "/v2/models/digits/infer", json=_json_infer(x), headers={"X-Request-ID": "audit-me"}
        )
    audit_file = store.root.parent / "audit" / "audit.jsonl"
    # Execute: the line is written right after the response is sent, so allow it a moment
    for _ in range(200):
        text = audit_file.read_text()
        if "audit-me" in text:
            break
        time.sleep(0.01)
    lines = [json.loads(line) for line in text.splitlines()]
    # Assert
    mine = [r for r in lines if r["request_id"] == "audit-me"]
    assert len(mine) == 1
    assert {
        k: mine[0][k] for k in ("principal", "model", "version", "rows", "status", "endpoint")
    } == {
        "principal": "anonymous",
        "model": "digits",
        "version": 2,
        "rows": 2,
        "status": 200,
        "endpoint": "infer",
    }
    assert mine[0]["batch_size"] >= 2 and mine[0]["latency_ms"] > 0
    assert "31415.9" not in text  # no input values, ever (a '.' rules out ids and times)
    allowed = {
        "ts",
        "request_id",
        "principal",
        "method",
        "endpoint",
        "model",
        "version",
        "rows",
        "batch_size",
        "latency_ms",
        "status",
    }
    assert all(set(r) == allowed for r in lines)


def test_server_without_a_model_is_live_but_not_ready(tmp_path: Path) -> None:
    options = options_for(tmp_path / "models")
    with running_server(options, expect_ready=False) as url, httpx.Client(base_url=url) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 503
        assert client.post("/v2/models/digits/infer", json=_bad()).status_code == 503


def test_a_pinned_version_is_ready_only_if_it_can_be_served(tmp_path: Path) -> None:
    """Ready means servable: a pinned version whose weights were tampered with is 503
    not ready (like its infer), an unknown version 404, a good one 200."""
    # Prepare: version 1 is damaged on disk after it was accepted; version 2 is current
    store = publish_versions(tmp_path, generate_signing_key(), [1, 2])
    weights = next(store.path(1).glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    options = options_for(store.root, audit_dir=tmp_path / "audit", pin_versions=(1,))
    # Execute
    with running_server(options) as url, httpx.Client(base_url=url) as client:
        damaged = client.get("/v2/models/digits/versions/1/ready")
        good = client.get("/v2/models/digits/versions/2/ready")
        unknown = client.get("/v2/models/digits/versions/9/ready")
        current = client.get("/v2/models/digits/ready")
    # Assert
    assert (damaged.status_code, damaged.json()) == (503, {"ready": False})
    assert (good.status_code, good.json()) == (200, {"ready": True})
    assert (unknown.status_code, unknown.json()) == (404, {"ready": False})
    assert current.status_code == 200
