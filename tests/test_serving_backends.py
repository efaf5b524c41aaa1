"""Backends (torch, int8, onnx) agree with the float model; a lossy one is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from artifact_factory import INPUT_DIM, publish_versions
from serving_harness import options_for, running_server

from fedinfer.artifacts import generate_signing_key
from fedinfer.errors import ServingError
from fedinfer.serving.backends import build_backend, check_backend


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    return publish_versions(
        tmp_path_factory.mktemp("site"), generate_signing_key(), [1, 2], model="cnn1d"
    )


@pytest.mark.parametrize(
    ("name", "atol"), [("torch", 0.0), ("onnx", 1e-4), ("int8", 0.5)], ids=["torch", "onnx", "int8"]
)
def test_backend_matches_the_float_model(store, name: str, atol: float) -> None:
    # Prepare
    weights, manifest = store.load()
    x = np.random.default_rng(0).normal(size=(64, INPUT_DIM)).astype(np.float32)
    reference = build_backend("torch", weights, manifest)
    # Execute
    backend = build_backend(name, weights, manifest, threads=1)
    check = check_backend(
        backend, reference, x, reference.predict(x).argmax(1), max_accuracy_drop=0.1
    )
    # Assert
    assert backend.name == name and check.samples == 64
    assert check.max_abs_logit_diff <= atol
    assert check.float_accuracy == 1.0 and check.accuracy is not None
    if name != "int8":
        assert check.agreement == 1.0


def test_backend_losing_too_much_accuracy_is_refused(store) -> None:
    """Negative twin: weights of another version stand in for a badly degraded backend."""
    # Prepare
    w1, m1 = store.load(1)
    w2, m2 = store.load(2)
    x = np.random.default_rng(1).normal(size=(200, INPUT_DIM)).astype(np.float32)
    reference = build_backend("torch", w2, m2)
    degraded = build_backend("onnx", w1, m1)
    # Execute / Assert
    with pytest.raises(ServingError, match="loses .* accuracy"):
        check_backend(
            degraded, reference, x, reference.predict(x).argmax(1), max_accuracy_drop=0.01
        )


@pytest.mark.parametrize("backend", ["onnx", "int8"], ids=["onnx", "int8"])
def test_server_checks_a_backend_against_validation_data(
    tmp_path: Path, store, backend: str
) -> None:
    # Prepare
    weights, manifest = store.load()
    x = np.random.default_rng(2).normal(size=(100, INPUT_DIM)).astype(np.float32)
    y = build_backend("torch", weights, manifest).predict(x).argmax(1)
    np.savez(tmp_path / "val.npz", x=x, y=y)
    options = options_for(
        store.root,
        backend=backend,
        validation_data=tmp_path / "val.npz",
        max_accuracy_drop=0.2,
        audit_dir=tmp_path / "audit",
    )
    # Execute / Assert: starts and serves
    import httpx

    with running_server(options) as url, httpx.Client(base_url=url) as client:
        meta = client.get("/v2/models/digits").json()
    assert meta["platform"] == f"fedinfer_{backend}"
