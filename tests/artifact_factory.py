"""Helpers shared by the artifact and serving tests: signed artifacts of tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedinfer.artifacts import ModelStore, weights_from_module, write_artifact
from fedinfer.config.schema import ModelConfig
from fedinfer.models import build_model

INPUT_DIM = 40
NUM_CLASSES = 10


def tiny_weights(name: str = "mlp", *, seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    cfg = tiny_cfg(name)
    return weights_from_module(build_model(cfg, input_dim=INPUT_DIM, num_classes=NUM_CLASSES))


def tiny_cfg(name: str = "mlp") -> ModelConfig:
    if name == "mlp":
        return ModelConfig(name="mlp", hidden_sizes=[32, 16])
    if name == "cnn1d":
        return ModelConfig(name="cnn1d", channels=8, groups=4)
    return ModelConfig(name=name)


def make_artifact(
    out_dir: Path,
    key: Ed25519PrivateKey,
    *,
    version: int = 1,
    model: str = "mlp",
    seed: int | None = None,
    name: str = "digits",
) -> Path:
    return write_artifact(
        out_dir,
        weights=tiny_weights(model, seed=version if seed is None else seed),
        model_cfg=tiny_cfg(model),
        input_dim=INPUT_DIM,
        num_classes=NUM_CLASSES,
        version=version,
        server_round=version,
        metrics={"accuracy": 0.5 + version / 100, "loss": 1.0},
        privacy={"epsilon": 1.5 * version, "delta": 1e-5},
        run_id="test-run",
        signing_key=key,
        name=name,
    )


def publish_versions(
    root: Path, key: Ed25519PrivateKey, versions: list[int], *, model: str = "mlp", keep: int = 5
) -> ModelStore:
    store = ModelStore(root / "models", keep=keep)
    for v in versions:
        art = make_artifact(root / "outbox" / f"v{v}", key, version=v, model=model)
        store.publish(art, public_key=key.public_key())
    return store
