"""Model artifacts: signed round trip, and every kind of tampering rejected."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_factory import INPUT_DIM, NUM_CLASSES, make_artifact, tiny_cfg, tiny_weights

from fedinfer.artifacts import (
    ModelManifest,
    generate_signing_key,
    load_public_key,
    load_signing_key,
    load_torch_model,
    read_manifest,
    read_weights,
    save_public_key,
    save_signing_key,
    verify_artifact,
    write_artifact,
)
from fedinfer.errors import ConfigError, ModelIntegrityError


@pytest.fixture()
def key():
    return generate_signing_key()


def test_round_trip_gives_the_same_predictions(tmp_path: Path, key) -> None:
    """A written artifact verifies, and the loaded model equals the original bit for bit."""
    # Prepare
    weights = tiny_weights("cnn1d", seed=3)
    x = torch.randn(5, INPUT_DIM)
    # Execute
    art = write_artifact(
        tmp_path / "v1",
        weights=weights,
        model_cfg=tiny_cfg("cnn1d"),
        input_dim=INPUT_DIM,
        num_classes=NUM_CLASSES,
        version=1,
        server_round=4,
        metrics={"accuracy": np.float32(0.75)},
        privacy={"epsilon": float("inf")},
        run_id="r1",
        signing_key=key,
        class_labels=[str(i) for i in range(NUM_CLASSES)],
    )
    manifest = verify_artifact(art, public_key=key.public_key())
    loaded = read_weights(art, manifest)
    # Assert
    assert sorted(p.name for p in art.iterdir()) == ["manifest.json", "weights.safetensors"]
    assert (manifest.version, manifest.server_round, manifest.name) == (1, 4, "cnn1d")
    assert manifest.inputs[0].to_dict() == {"name": "input", "shape": [-1, 40], "datatype": "FP32"}
    assert manifest.outputs[0].shape == (-1, NUM_CLASSES)
    assert manifest.metrics == {"accuracy": 0.75} and manifest.privacy == {"epsilon": "inf"}
    assert manifest.created.endswith("Z") and manifest.signature is not None
    for k, v in weights.items():
        np.testing.assert_array_equal(loaded[k], v)
    model = load_torch_model(loaded, manifest)
    reference = load_torch_model(weights, manifest)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_manifest_json_is_plain_strict_json(tmp_path: Path, key) -> None:
    # Prepare
    art = make_artifact(tmp_path / "a", key)
    # Execute
    data = json.loads((art / "manifest.json").read_text())
    # Assert
    assert data["signature"]["algorithm"] == "ed25519"
    assert ModelManifest.from_dict(data).to_dict() == data


def _edit_manifest(art: Path, **changes: object) -> None:
    data = json.loads((art / "manifest.json").read_text())
    data.update(changes)
    (art / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda a: _flip_byte(a / "weights.safetensors"), "sha256"),
        (lambda a: _edit_manifest(a, metrics={"accuracy": 0.99}), "signature"),
        (lambda a: _edit_manifest(a, version=99), "signature"),
        (lambda a: _edit_manifest(a, signature=None), "unsigned"),
        (lambda a: _edit_manifest(a, signature={"algorithm": "ed25519", "value": "!!"}), "base64"),
        (lambda a: (a / "weights.safetensors").unlink(), "cannot read"),
        (lambda a: (a / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda a: _edit_manifest(a, evil="x"), "unknown manifest fields"),
    ],
    ids=[
        "weights-byte",
        "metrics-edit",
        "version-edit",
        "unsigned",
        "bad-b64",
        "no-weights",
        "bad-json",
        "extra-field",
    ],
)
def test_tampered_artifact_is_rejected(tmp_path: Path, key, tamper, reason: str) -> None:
    # Prepare
    art = make_artifact(tmp_path / "a", key)
    tamper(art)
    # Execute / Assert
    with pytest.raises(ModelIntegrityError, match=reason):
        verify_artifact(art, public_key=key.public_key())


def test_signature_by_another_key_is_rejected(tmp_path: Path, key) -> None:
    """Negative twin of the round trip: same bytes, untrusted key."""
    # Prepare
    art = make_artifact(tmp_path / "a", key)
    other = generate_signing_key()
    # Execute / Assert
    with pytest.raises(ModelIntegrityError, match="not the trusted key"):
        verify_artifact(art, public_key=other.public_key())


def test_re_signing_with_an_attacker_key_does_not_help(tmp_path: Path, key) -> None:
    # Prepare: attacker builds a complete valid artifact with its own key
    attacker = generate_signing_key()
    art = make_artifact(tmp_path / "a", attacker)
    # Execute / Assert
    with pytest.raises(ModelIntegrityError):
        verify_artifact(art, public_key=key.public_key())
    assert verify_artifact(art, public_key=attacker.public_key()).version == 1


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_weights_that_do_not_fit_the_model_are_never_signed(tmp_path: Path, key) -> None:
    # Prepare
    weights = tiny_weights("mlp")
    weights.pop(next(iter(weights)))
    # Execute / Assert
    with pytest.raises(ConfigError, match="do not fit"):
        write_artifact(
            tmp_path / "a",
            weights=weights,
            model_cfg=tiny_cfg("mlp"),
            input_dim=INPUT_DIM,
            num_classes=NUM_CLASSES,
            version=1,
            server_round=1,
            metrics={},
            privacy={},
            run_id="r",
            signing_key=key,
        )
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"version": 0}, "version"),
        ({"server_round": -1}, "server_round"),
        ({"metrics": {"obj": object()}}, "metrics.obj"),
    ],
    ids=["version-0", "negative-round", "non-json-metric"],
)
def test_bad_write_arguments_name_the_argument(tmp_path: Path, key, kwargs, match: str) -> None:
    # Prepare
    args = {
        "weights": tiny_weights("mlp"),
        "model_cfg": tiny_cfg("mlp"),
        "input_dim": INPUT_DIM,
        "num_classes": NUM_CLASSES,
        "version": 1,
        "server_round": 1,
        "metrics": {},
        "privacy": {},
        "run_id": "r",
        "signing_key": key,
    }
    args.update(kwargs)
    # Execute / Assert
    with pytest.raises(ConfigError, match=match):
        write_artifact(tmp_path / "a", **args)


def test_existing_non_empty_directory_is_not_overwritten(tmp_path: Path, key) -> None:
    # Prepare
    art = make_artifact(tmp_path / "a", key)
    before = (art / "manifest.json").read_bytes()
    # Execute / Assert
    with pytest.raises(ConfigError, match="not empty"):
        make_artifact(tmp_path / "a", key, version=2)
    assert (art / "manifest.json").read_bytes() == before


def test_keys_round_trip_and_private_key_is_owner_only(tmp_path: Path, key) -> None:
    # Prepare
    priv, pub = tmp_path / "coordinator.key", tmp_path / "coordinator.pub"
    # Execute
    save_signing_key(key, priv)
    save_public_key(key, pub)
    art = make_artifact(tmp_path / "a", load_signing_key(priv))
    # Assert
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert verify_artifact(art, public_key=load_public_key(pub)).version == 1
    with pytest.raises(ConfigError, match="already exists"):
        save_signing_key(generate_signing_key(), priv)
    with pytest.raises(ConfigError, match="not an Ed25519 private key"):
        load_signing_key(pub)


def test_read_manifest_does_not_verify(tmp_path: Path, key) -> None:
    """read_manifest is for display: it parses an unsigned manifest that verify rejects."""
    # Prepare
    art = make_artifact(tmp_path / "a", key)
    _edit_manifest(art, signature=None)
    # Execute / Assert
    assert read_manifest(art).signature is None
