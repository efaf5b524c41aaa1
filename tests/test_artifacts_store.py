"""ModelStore: verified publish, atomic current, retention, rollback, crash safety."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from artifact_factory import make_artifact, publish_versions, tiny_weights

from fedinfer.artifacts import ModelStore, generate_signing_key
from fedinfer.errors import ConfigError, ModelIntegrityError


@pytest.fixture()
def key():
    return generate_signing_key()


def test_publish_makes_the_version_current_and_loadable(tmp_path: Path, key) -> None:
    # Prepare
    store = ModelStore(tmp_path / "models")
    art = make_artifact(tmp_path / "out", key, version=3)
    # Execute
    version = store.publish(art, public_key=key.public_key())
    weights, manifest = store.load()
    # Assert
    assert version == 3 and store.current_version() == 3 and store.versions() == [3]
    assert manifest.version == 3 and store.manifest(3) == manifest
    for k, v in tiny_weights("mlp", seed=3).items():
        np.testing.assert_array_equal(weights[k], v)
    assert json.loads((tmp_path / "models" / "CURRENT").read_text())["version"] == 3


def test_empty_store_has_no_current(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    assert store.current_version() is None and store.versions() == []
    with pytest.raises(ModelIntegrityError, match="no current version"):
        store.load()


def _tamper_weights(art: Path) -> None:
    data = bytearray((art / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (art / "weights.safetensors").write_bytes(bytes(data))


def _tamper_manifest(art: Path) -> None:
    data = json.loads((art / "manifest.json").read_text())
    data["privacy"]["epsilon"] = 0.01
    (art / "manifest.json").write_text(json.dumps(data))


def _unsign(art: Path) -> None:
    data = json.loads((art / "manifest.json").read_text())
    data["signature"] = None
    (art / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [(_tamper_weights, "sha256"), (_tamper_manifest, "signature"), (_unsign, "unsigned")],
    ids=["weights", "manifest", "unsigned"],
)
def test_rejected_artifact_never_becomes_current(
    tmp_path: Path, key, tamper, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    store = publish_versions(tmp_path, key, [1])
    art = make_artifact(tmp_path / "bad", key, version=2)
    tamper(art)
    # Execute
    with caplog.at_level(logging.ERROR, logger="fedinfer.artifacts.store"):
        with pytest.raises(ModelIntegrityError, match=reason):
            store.publish(art, public_key=key.public_key())
    # Assert
    assert store.current_version() == 1 and store.versions() == [1]
    assert any("rejected model artifact" in r.message for r in caplog.records)
    assert list((tmp_path / "models" / ".staging").iterdir()) == []


def test_wrong_key_is_rejected_by_the_store(tmp_path: Path, key) -> None:
    # Prepare
    store = ModelStore(tmp_path / "models")
    art = make_artifact(tmp_path / "a", generate_signing_key())
    # Execute / Assert
    with pytest.raises(ModelIntegrityError, match="not the trusted key"):
        store.publish(art, public_key=key.public_key())
    assert store.current_version() is None and store.versions() == []


def test_load_detects_weights_altered_after_publish(tmp_path: Path, key) -> None:
    # Prepare
    store = publish_versions(tmp_path, key, [1])
    _tamper_weights(store.path(1))
    # Execute / Assert
    with pytest.raises(ModelIntegrityError, match="sha256"):
        store.load()


def test_load_with_public_key_re_verifies_the_signature(tmp_path: Path, key) -> None:
    # Prepare
    store = publish_versions(tmp_path, key, [1])
    _tamper_manifest(store.path(1))
    # Execute / Assert
    # the hash still matches: only the signature catches a manifest edit, with the given
    # key or, without one, the key the store pinned at its first publish (issue 12 item 12)
    with pytest.raises(ModelIntegrityError, match="signature"):
        store.load(public_key=key.public_key())
    with pytest.raises(ModelIntegrityError, match="signature"):
        store.load()


def test_retention_keeps_last_k_plus_current_and_its_predecessor(tmp_path: Path, key) -> None:
    # Prepare
    store = publish_versions(tmp_path, key, [1, 2, 3], keep=2)
    assert store.versions() == [2, 3]
    store.rollback()  # -> 2
    # Execute
    store.publish(
        make_artifact(tmp_path / "o4", key, version=4),
        public_key=key.public_key(),
        make_current=False,
    )
    kept_while_rolled_back = store.versions()
    store.publish(make_artifact(tmp_path / "o5", key, version=5), public_key=key.public_key())
    # Assert: newest two, plus current (2) while it is current; then newest two = current + prev
    assert kept_while_rolled_back == [2, 3, 4]
    assert store.versions() == [4, 5] and store.current_version() == 5


def test_retention_never_deletes_current_or_rollback_target(tmp_path: Path, key) -> None:
    # Prepare
    store = publish_versions(tmp_path, key, [1, 2, 3, 4], keep=2)
    assert store.versions() == [3, 4]
    store.rollback()  # -> 3
    # Execute
    store.publish(
        make_artifact(tmp_path / "o5", key, version=5),
        public_key=key.public_key(),
        make_current=False,
    )
    store.publish(
        make_artifact(tmp_path / "o6", key, version=6),
        public_key=key.public_key(),
        make_current=False,
    )
    # Assert: newest two {5, 6} + current 3 (its older neighbour is gone already)
    assert store.current_version() == 3 and store.versions() == [3, 5, 6]


def test_rollback_default_steps_back_and_explicit_target(tmp_path: Path, key) -> None:
    # Prepare
    store = publish_versions(tmp_path, key, [1, 2, 3])
    # Execute / Assert
    assert store.rollback() == 2 and store.current_version() == 2
    assert store.rollback() == 1
    with pytest.raises(ConfigError, match="no version older"):
        store.rollback()
    assert store.rollback(to=3) == 3 and store.current_version() == 3
    with pytest.raises(ConfigError, match="not in"):
        store.rollback(to=9)


def test_rollback_refuses_a_corrupted_target(tmp_path: Path, key) -> None:
    # Prepare
    store = publish_versions(tmp_path, key, [1, 2])
    _tamper_weights(store.path(1))
    # Execute / Assert
    with pytest.raises(ModelIntegrityError):
        store.rollback()
    assert store.current_version() == 2


def test_downgrade_replay_and_conflicting_republish_are_refused(tmp_path: Path, key) -> None:
    # Prepare
    store = publish_versions(tmp_path, key, [1, 2, 3, 4], keep=2)  # 1 and 2 pruned
    old = make_artifact(tmp_path / "old1", key, version=1)
    conflicting = make_artifact(tmp_path / "c4", key, version=4, seed=99)
    # Execute / Assert
    with pytest.raises(ModelIntegrityError, match="older than current"):
        store.publish(old, public_key=key.public_key())
    with pytest.raises(ModelIntegrityError, match="different content"):
        store.publish(conflicting, public_key=key.public_key())
    assert store.current_version() == 4


def test_identical_republish_is_a_noop(tmp_path: Path, key) -> None:
    # Prepare
    store = publish_versions(tmp_path, key, [1, 2])
    # Execute
    version = store.publish(tmp_path / "outbox" / "v1", public_key=key.public_key())
    # Assert
    assert version == 1 and store.current_version() == 2


def test_other_model_name_is_refused(tmp_path: Path, key) -> None:
    # Prepare
    store = publish_versions(tmp_path, key, [1])
    art = make_artifact(tmp_path / "x", key, version=2, name="another")
    # Execute / Assert
    with pytest.raises(ModelIntegrityError, match="one store per model"):
        store.publish(art, public_key=key.public_key())


def test_current_switch_is_atomic_for_concurrent_readers(tmp_path: Path, key) -> None:
    """A reader polling CURRENT while versions flip only ever sees complete, valid versions."""
    # Prepare
    store = publish_versions(tmp_path, key, [1, 2, 3])
    reader = textwrap.dedent(f"""
        import json, sys
        seen = set()
        for _ in range(3000):
            state = json.loads(open({str(store.root / "CURRENT")!r}).read())
            seen.add(state["version"])
        print(sorted(seen))
    """)
    proc = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, text=True)
    # Execute
    while proc.poll() is None:
        store.rollback(to=1)
        store.rollback(to=3)
    out, _ = proc.communicate()
    # Assert
    assert proc.returncode == 0
    assert set(json.loads(out)) <= {1, 3}


def test_crash_during_publish_leaves_current_intact(tmp_path: Path, key) -> None:
    """A publisher killed while staging (SIGKILL) leaves only staging debris, cleaned next time."""
    # Prepare
    store = publish_versions(tmp_path, key, [1])
    art = make_artifact(tmp_path / "o2", key, version=2)
    script = textwrap.dedent(f"""
        import os, signal
        from fedinfer.artifacts import ModelStore, load_public_key
        def dying_fsync(fd):
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = dying_fsync  # the first fsync is the first staged file's
        ModelStore({str(store.root)!r}).publish({str(art)!r},
                   public_key=load_public_key({str(tmp_path / "k.pub")!r}))
    """)
    from fedinfer.artifacts import save_public_key

    save_public_key(key, tmp_path / "k.pub")
    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    # Assert
    assert proc.returncode == -9
    assert store.current_version() == 1 and store.versions() == [1]
    assert any((store.root / ".staging").iterdir())
    assert store.publish(art, public_key=key.public_key()) == 2
    assert list((store.root / ".staging").iterdir()) == []
    assert store.current_version() == 2
