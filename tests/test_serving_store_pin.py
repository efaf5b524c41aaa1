"""The store pins the coordinator's signing key at the first publish (issue 12 item 12).

A standalone ``fedinfer serve``/``predict`` without ``--public-key`` used to load any
version whose manifest hash matched its weights, so an unsigned version planted in a
plaintext store was served. Every load is now checked against the pinned key.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from artifact_factory import INPUT_DIM, make_artifact, publish_versions
from serving_harness import options_for, running_server

from fedinfer.artifacts import ModelStore, generate_signing_key
from fedinfer.artifacts.store import SIGNING_KEY_FILE
from fedinfer.errors import ModelIntegrityError

BODY = {
    "inputs": [
        {"name": "input", "shape": [1, INPUT_DIM], "datatype": "FP32", "data": [0.0] * INPUT_DIM}
    ]
}


def _plant_unsigned(store: ModelStore, source: int, version: int) -> None:
    """What an attacker with write access to a plaintext store does: copy a version,
    renumber it, strip the signature (the weights hash still matches), make it current."""
    shutil.copytree(store.path(source), store.path(version))
    manifest_path = store.path(version) / "manifest.json"
    doc = json.loads(manifest_path.read_text())
    doc["version"], doc["signature"] = version, None
    manifest_path.write_text(json.dumps(doc))
    store._switch(version)


def test_an_unsigned_planted_version_is_never_served(tmp_path: Path) -> None:
    # Prepare
    store = publish_versions(tmp_path, generate_signing_key(), [1])
    with running_server(options_for(store.root)) as url, httpx.Client(base_url=url) as client:
        # Execute
        _plant_unsigned(store, 1, 2)
        served = []
        for _ in range(20):  # the watcher polls every 50 ms
            served.append(client.post("/v2/models/digits/infer", json=BODY).json()["model_version"])
            time.sleep(0.05)
        metrics = client.get("/metrics").text
    # Assert
    assert set(served) == {"1"}
    assert "fedinfer_model_load_failures_total 1.0" in metrics
    with pytest.raises(ModelIntegrityError, match="unsigned"):
        store.load(2)  # what `fedinfer predict` without --public-key does


def test_a_publish_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    store = publish_versions(tmp_path, generate_signing_key(), [1])
    intruder = generate_signing_key()
    art = make_artifact(tmp_path / "evil", intruder, version=2)
    with pytest.raises(ModelIntegrityError, match="pinned to"):
        store.publish(art, public_key=intruder.public_key())
    assert store.versions() == [1]
    assert (store.root / SIGNING_KEY_FILE).is_file()


def test_a_load_with_another_public_key_is_refused(tmp_path: Path) -> None:
    store = publish_versions(tmp_path, generate_signing_key(), [1])
    with pytest.raises(ModelIntegrityError, match="not the key this store is pinned to"):
        store.load(1, public_key=generate_signing_key().public_key())
