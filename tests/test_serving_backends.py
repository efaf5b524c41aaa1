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


def test_pruning_zeroes_the_smallest_share_of_weights_globally(store) -> None:
    from torch import nn

    from fedinfer.artifacts import load_torch_model
    from fedinfer.serving.backends import prune_model

    # Prepare
    weights, manifest = store.load()
    model = load_torch_model(weights, manifest)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv1d)]
    magnitudes = np.concatenate([m.weight.detach().abs().numpy().ravel() for m in layers])
    biases = [m.bias.detach().clone() for m in layers if m.bias is not None]
    # Execute
    pruned = prune_model(model, 0.6)
    # Assert: 60% of all prunable weights are zero, and they are the smallest ones
    after = np.concatenate([m.weight.detach().numpy().ravel() for m in layers])
    zeroed = after == 0
    assert zeroed.mean() == pytest.approx(0.6, abs=1 / len(after))
    assert magnitudes[zeroed].max() <= magnitudes[~zeroed].min()
    assert all(
        np.array_equal(b.numpy(), m.bias.detach().numpy())
        for b, m in zip(biases, [m for m in layers if m.bias is not None], strict=True)
    )
    assert not any(name.endswith("_orig") for name in pruned.state_dict()), "made permanent"


@pytest.mark.parametrize("amount", [-0.1, 1.0], ids=["negative", "everything"])
def test_a_prune_amount_outside_0_1_is_a_config_error(store, amount: float) -> None:
    from fedinfer.errors import ConfigError

    weights, manifest = store.load()
    with pytest.raises(ConfigError, match="--prune-amount"):
        build_backend("torch", weights, manifest, prune_amount=amount)


@pytest.mark.parametrize("name", ["torch", "onnx"])
def test_light_pruning_passes_the_check_and_heavy_pruning_is_refused(store, name: str) -> None:
    # Prepare
    weights, manifest = store.load()
    x = np.random.default_rng(3).normal(size=(300, INPUT_DIM)).astype(np.float32)
    reference = build_backend("torch", weights, manifest)
    y = reference.predict(x).argmax(1)
    # Execute
    light = build_backend(name, weights, manifest, prune_amount=0.05)
    heavy = build_backend(name, weights, manifest, prune_amount=0.98)
    # Assert
    check = check_backend(light, reference, x, y, max_accuracy_drop=0.1)
    assert check.accuracy_drop <= 0.1 and check.max_abs_logit_diff > 0
    with pytest.raises(ServingError, match="--prune-amount"):
        check_backend(heavy, reference, x, y, max_accuracy_drop=0.05)


def test_the_server_serves_the_pruned_model_over_a_socket(tmp_path: Path, store) -> None:
    import httpx

    # Prepare
    weights, manifest = store.load()
    x = np.random.default_rng(4).normal(size=(4, INPUT_DIM)).astype(np.float32)
    expected = build_backend("torch", weights, manifest, prune_amount=0.3).predict(x).argmax(1)
    unpruned = build_backend("torch", weights, manifest).predict(x)
    np.savez(tmp_path / "val.npz", x=x, y=unpruned.argmax(1))
    options = options_for(
        store.root,
        prune_amount=0.3,
        validation_data=tmp_path / "val.npz",
        max_accuracy_drop=1.0,
        audit_dir=tmp_path / "audit",
    )
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    # Execute
    with running_server(options) as url, httpx.Client(base_url=url) as client:
        reply = client.post(f"/v2/models/{manifest.name}/infer", json=body)
    # Assert
    assert reply.status_code == 200, reply.text
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    assert outputs["predicted_class"]["data"] == expected.tolist()


def test_a_server_whose_pruned_model_loses_too_much_refuses_to_start(tmp_path: Path, store) -> None:
    import asyncio

    from fedinfer.serving.server import build_app

    # Prepare
    weights, manifest = store.load()
    x = np.random.default_rng(5).normal(size=(300, INPUT_DIM)).astype(np.float32)
    np.savez(
        tmp_path / "val.npz", x=x, y=build_backend("torch", weights, manifest).predict(x).argmax(1)
    )
    app = build_app(
        options_for(
            store.root,
            prune_amount=0.98,
            validation_data=tmp_path / "val.npz",
            max_accuracy_drop=0.01,
            audit_dir=tmp_path / "audit",
        )
    )

    # Execute / Assert
    async def start() -> None:
        try:
            await app.manager.start()
        finally:
            await app.manager.stop()

    with pytest.raises(ServingError, match="loses .* accuracy"):
        asyncio.run(start())
