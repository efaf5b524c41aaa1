"""Encryption at rest: the sealed format, the key file, and every part of a site's state.

Real files, real crypto, real processes: a negative twin for each positive case (wrong
key, tampered byte, swapped files, truncated or deleted audit lines, plaintext where
ciphertext is expected), a publisher killed mid-publish, a real server over a socket,
and a scan of the whole state directory for anything readable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
from artifact_factory import INPUT_DIM, make_artifact, tiny_weights
from at_rest_helpers import plaintext_hits
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedinfer.artifacts import MANIFEST_FILE, WEIGHTS_FILE, ModelStore, save_public_key
from fedinfer.cli import main as cli_main
from fedinfer.crypto import StateKey, is_sealed, mark_state_dir, read_marker, resolve_state_key
from fedinfer.crypto.migrate import reseal_state_dir
from fedinfer.errors import DataError, ModelIntegrityError, PrivacyLedgerError, StateKeyError
from fedinfer.privacy import PrivacyLedger
from fedinfer.serving.audit import AuditLog, summarize_audit

RECORD = {"ts": "2025-01-01T00:00:00+00:00", "principal": "lab", "rows": 2, "status": 200}


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def state_key(tmp_path: Path) -> StateKey:
    key = StateKey.generate()
    key.save(tmp_path / "keys" / "site.key")  # outside every state dir the tests use
    return key


def _publish(store: ModelStore, outbox: Path, signing_key: Ed25519PrivateKey, *versions: int):
    for v in versions:
        art = make_artifact(outbox / f"v{v}", signing_key, version=v)
        store.publish(art, public_key=signing_key.public_key())
    return store


def _charge(state_dir: Path, key: StateKey | None) -> PrivacyLedger:
    ledger = PrivacyLedger.open(state_dir, accountant="rdp", delta=1e-5, num_samples=1000, key=key)
    ledger.charge(server_round=1, run_id="r", noise_multiplier=1.1, sample_rate=0.01, steps=50)
    return ledger


def _audit(directory: Path, key: StateKey | None, n: int = 5, **kwargs: int) -> None:
    log = AuditLog(directory, key=key, **kwargs)
    for i in range(n):
        log.write({**RECORD, "request_id": str(i)})
    log.close()


# ------------------------------------------------------------------ format and key file
def test_sealed_blob_round_trips_and_binds_key_name_and_content() -> None:
    # Prepare
    key, other = StateKey.generate(), StateKey.generate()
    blob = key.seal(b"secret state", name="ledger")
    tampered = bytearray(blob)
    tampered[-5] ^= 1
    # Execute / Assert
    assert key.open(blob, name="ledger") == b"secret state"
    assert is_sealed(blob) and b"secret" not in blob
    assert key.seal(b"secret state", name="ledger") != blob  # a fresh nonce every time
    with pytest.raises(StateKeyError, match=f"key id {key.key_id}, not with key id {other.key_id}"):
        other.open(blob, name="ledger")
    with pytest.raises(ModelIntegrityError, match="fails authentication"):
        key.open(bytes(tampered), name="ledger", tampered=ModelIntegrityError)
    with pytest.raises(ModelIntegrityError, match="moved here from another place"):
        key.open(blob, name="models", tampered=ModelIntegrityError)
    with pytest.raises(StateKeyError, match="is not encrypted"):
        key.open(b'{"plain": true}', name="ledger")


def test_key_file_is_private_never_overwritten_and_checked_on_load(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "keys" / "site.key"
    key = StateKey.generate()
    # Execute
    key.save(path)
    loaded = StateKey.load(path)
    # Assert
    assert (path.stat().st_mode & 0o777) == 0o600
    assert loaded.key_id == key.key_id and loaded.open(key.seal(b"x", name="n"), name="n") == b"x"
    secret_b64 = path.read_text().split()[-1]
    assert secret_b64 not in repr(loaded) and loaded.key_id in repr(loaded)
    with pytest.raises(StateKeyError, match="refusing to overwrite"):
        StateKey.generate().save(path)
    path.chmod(0o640)
    with pytest.raises(StateKeyError, match="chmod 600"):
        StateKey.load(path)
    (tmp_path / "junk.key").write_text("not a key\n")
    (tmp_path / "junk.key").chmod(0o600)
    with pytest.raises(StateKeyError, match="not a fedinfer state key file"):
        StateKey.load(tmp_path / "junk.key")


def test_a_key_inside_the_state_it_protects_is_refused(tmp_path: Path) -> None:
    StateKey.generate().save(tmp_path / "state" / "site.key")
    with pytest.raises(StateKeyError, match="inside"):
        resolve_state_key(tmp_path / "state" / "site.key", protects=[tmp_path / "state"])


def test_the_key_can_come_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    key = StateKey.generate()
    key.save(tmp_path / "site.key")
    monkeypatch.setenv("FEDINFER_STATE_KEY_FILE", str(tmp_path / "site.key"))
    resolved = resolve_state_key(None)
    assert resolved is not None and resolved.key_id == key.key_id


# ------------------------------------------------------------------------ model store
def test_encrypted_store_round_trips_and_holds_only_ciphertext(
    tmp_path: Path, signing_key, state_key
) -> None:
    # Prepare
    store = ModelStore(tmp_path / "site" / "models", key=state_key)
    # Execute
    _publish(store, tmp_path / "outbox", signing_key, 1, 2)
    weights, manifest = store.load(public_key=signing_key.public_key())
    # Assert
    assert store.current_version() == 2 and manifest.version == 2
    for name, array in tiny_weights(seed=2).items():
        np.testing.assert_array_equal(weights[name], array)
    assert store.rollback() == 1 and store.manifest().version == 1
    for path in [store.root / "CURRENT", *store.path(2).iterdir()]:
        assert is_sealed(path.read_bytes()), path
    assert plaintext_hits(store.root) == []


def test_swapping_files_between_versions_is_detected(
    tmp_path: Path, signing_key, state_key
) -> None:
    # Prepare: both versions sealed with the same key; move v1's weights into v2
    store = _publish(
        ModelStore(tmp_path / "models", key=state_key), tmp_path / "out", signing_key, 1, 2
    )
    shutil.copy(store.path(1) / WEIGHTS_FILE, store.path(2) / WEIGHTS_FILE)
    shutil.copy(store.path(1) / MANIFEST_FILE, tmp_path / "m1")
    # Execute / Assert
    with pytest.raises(ModelIntegrityError, match=r"versions/2/weights.safetensors.*fails auth"):
        store.load(2)
    shutil.copy(tmp_path / "m1", store.path(2) / MANIFEST_FILE)
    with pytest.raises(ModelIntegrityError, match="fails authentication"):
        store.manifest(2)


def test_wrong_key_missing_key_and_mixed_modes_are_refused(
    tmp_path: Path, signing_key, state_key
) -> None:
    # Prepare
    sealed = _publish(
        ModelStore(tmp_path / "sealed", key=state_key), tmp_path / "out", signing_key, 1
    )
    plain = _publish(ModelStore(tmp_path / "plain"), tmp_path / "out2", signing_key, 1)
    art = make_artifact(tmp_path / "out" / "v2b", signing_key, version=2)
    # Execute / Assert
    with pytest.raises(StateKeyError, match="not with key id"):
        ModelStore(sealed.root, key=StateKey.generate()).load()
    with pytest.raises(StateKeyError, match="encrypted at rest"):
        ModelStore(sealed.root).current_version()
    with pytest.raises(StateKeyError, match="is not encrypted"):
        ModelStore(plain.root, key=state_key).load()
    with pytest.raises(StateKeyError, match="encrypted at rest"):  # no plaintext added to it
        ModelStore(sealed.root).publish(art, public_key=signing_key.public_key())
    assert sealed.versions() == [1]


def test_a_publisher_killed_mid_publish_leaves_no_plaintext(
    tmp_path: Path, signing_key, state_key
) -> None:
    """SIGKILL right after the first staged file is written: the debris is ciphertext."""
    # Prepare
    store = _publish(
        ModelStore(tmp_path / "site" / "models", key=state_key), tmp_path / "o", signing_key, 1
    )
    art = make_artifact(tmp_path / "o" / "v2", signing_key, version=2)
    save_public_key(signing_key, tmp_path / "k.pub")
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from fedinfer.artifacts import ModelStore, load_public_key
        from fedinfer.crypto import StateKey
        key = StateKey.load(Path({str(state_key.path)!r}))
        public_key = load_public_key(Path({str(tmp_path / "k.pub")!r}))
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # first fsync: staged file
        ModelStore(Path({str(store.root)!r}), key=key).publish(
            Path({str(art)!r}), public_key=public_key
        )
    """)
    # Execute
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    # Assert
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    staged = [p for p in (store.root / ".staging").rglob("*") if p.is_file()]
    assert staged and all(is_sealed(p.read_bytes()) for p in staged)
    assert plaintext_hits(store.root) == []
    assert store.current_version() == 1
    assert store.publish(art, public_key=signing_key.public_key()) == 2
    assert list((store.root / ".staging").iterdir()) == []


# ----------------------------------------------------------------------------- ledger
def test_encrypted_ledger_round_trips_and_rejects_tampering_and_wrong_keys(
    tmp_path: Path, state_key
) -> None:
    # Prepare
    epsilon = _charge(tmp_path / "site", state_key).epsilon
    path = tmp_path / "site" / "ledger.json"
    blob = bytearray(path.read_bytes())
    # Execute / Assert
    assert is_sealed(bytes(blob)) and b"noise_multiplier" not in blob
    assert PrivacyLedger.read(tmp_path / "site", key=state_key).epsilon == pytest.approx(epsilon)
    with pytest.raises(StateKeyError, match="encrypted at rest"):
        PrivacyLedger.read(tmp_path / "site")
    with pytest.raises(StateKeyError, match="not with key id"):
        PrivacyLedger.read(tmp_path / "site", key=StateKey.generate())
    blob[40] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(PrivacyLedgerError, match="fails authentication.*restore it"):
        PrivacyLedger.read(tmp_path / "site", key=state_key)


def test_a_state_dir_marked_encrypted_refuses_a_new_plaintext_ledger(
    tmp_path: Path, state_key
) -> None:
    """No ledger yet, but the site is encrypted: a process without the key must not start one."""
    mark_state_dir(tmp_path, state_key)
    with pytest.raises(StateKeyError, match="encrypted at rest"):
        _charge(tmp_path, None)
    with pytest.raises(StateKeyError, match="not with key id"):
        _charge(tmp_path, StateKey.generate())
    assert not (tmp_path / "ledger.json").exists()


# -------------------------------------------------------------------------- audit log
def test_encrypted_audit_log_rotates_restarts_and_summarizes(tmp_path: Path, state_key) -> None:
    # Execute: rotation every few lines, and a restart (a new chained file)
    _audit(tmp_path, state_key, 30, max_bytes=1500)
    _audit(tmp_path, state_key, 3)
    # Assert
    usage = summarize_audit(tmp_path, key=state_key)
    assert [(u.principal, u.requests, u.rows) for u in usage] == [("lab", 33, 66)]
    assert len(list(tmp_path.glob("audit-*.jsonl"))) > 3
    assert plaintext_hits(tmp_path) == []
    with pytest.raises(StateKeyError, match="encrypted at rest"):
        summarize_audit(tmp_path)
    with pytest.raises(StateKeyError, match="encrypted at rest"):
        AuditLog(tmp_path)  # no plaintext lines appended to an encrypted log


@pytest.mark.parametrize(
    "damage",
    ["truncate-line", "delete-line", "swap-lines", "flip-byte"],
    ids=["truncated", "deleted", "reordered", "edited"],
)
def test_damaged_audit_lines_are_named(tmp_path: Path, state_key, damage: str) -> None:
    # Prepare
    _audit(tmp_path, state_key, 6)
    path = tmp_path / "audit.jsonl"
    lines = path.read_bytes().split(b"\n")[:-1]
    if damage == "truncate-line":
        lines[3] = lines[3][:-10]
    elif damage == "delete-line":
        del lines[3]
    elif damage == "swap-lines":
        lines[3], lines[4] = lines[4], lines[3]
    else:
        lines[3] = lines[3][:5] + (b"A" if lines[3][5:6] != b"A" else b"B") + lines[3][6:]
    path.write_bytes(b"\n".join(lines) + b"\n")
    # Execute / Assert
    with pytest.raises(DataError, match=r"audit.jsonl line 4 fails authentication"):
        summarize_audit(tmp_path, key=state_key)


def test_a_deleted_rotated_audit_file_breaks_the_chain(tmp_path: Path, state_key) -> None:
    _audit(tmp_path, state_key, 30, max_bytes=1500)
    rotated = sorted(tmp_path.glob("audit-*.jsonl"))
    rotated[1].unlink()
    with pytest.raises(DataError, match="does not follow the audit file before it"):
        summarize_audit(tmp_path, key=state_key)


def test_a_torn_last_audit_line_from_a_crash_is_skipped(tmp_path: Path, state_key) -> None:
    _audit(tmp_path, state_key, 4)
    with open(tmp_path / "audit.jsonl", "ab") as fh:
        fh.write(b"QUJD")  # a write cut short: no newline
    assert summarize_audit(tmp_path, key=state_key)[0].requests == 4
    _audit(tmp_path, state_key, 1)  # a restart rotates the torn file away and chains to it
    assert summarize_audit(tmp_path, key=state_key)[0].requests == 5


# --------------------------------------------------- a whole site: serve over a socket
def test_encrypted_site_serves_over_a_socket_and_leaves_no_plaintext(
    tmp_path: Path, signing_key, state_key
) -> None:
    """Publish, serve (real process, real socket), audit and a ledger charge: all sealed."""
    from fedinfer.deploy.local import infer
    from fedinfer.serving.launch import SiteServer

    # Prepare
    state = tmp_path / "site"
    store = _publish(ModelStore(state / "models", key=state_key), tmp_path / "o", signing_key, 1, 2)
    _charge(state, state_key)
    x = np.random.default_rng(0).normal(size=(3, INPUT_DIM)).astype(np.float32)
    # Execute: the current version, then a pinned one whose manifest was replaced in plaintext
    shutil.copy(tmp_path / "o" / "v1" / MANIFEST_FILE, store.path(1) / MANIFEST_FILE)
    with SiteServer(
        store.root,
        audit_dir=state / "audit",
        log_file=tmp_path / "serve.log",
        extra_args=["--state-key", str(state_key.path), "--pin-versions", "1"],
    ) as server:
        answer = infer(server.url, model_name="digits", x=x)
        with httpx.Client(trust_env=False, timeout=30) as client:
            planted = client.post(
                f"{server.url}/v2/models/digits/versions/1/infer",
                json={"inputs": [{"name": "input", "shape": [1, INPUT_DIM], "datatype": "FP32",
                                  "data": [0.0] * INPUT_DIM}]},
            )  # fmt: skip
    (store.path(1) / MANIFEST_FILE).unlink()  # the planted plaintext, for the scan below
    # Assert
    assert answer["model_version"] == "2" and answer["outputs"][0]["shape"][0] == 3
    assert planted.status_code == 503 and "cannot be served" in planted.text, planted.text
    assert "is not encrypted" in (tmp_path / "serve.log").read_text()  # the reason, logged
    assert summarize_audit(state / "audit", key=state_key)[0].requests >= 1
    assert plaintext_hits(state) == []


# ------------------------------------------------------------------------------- CLI
def test_cli_errors_for_a_missing_or_wrong_key_are_one_line(
    tmp_path: Path, signing_key, state_key, capsys
) -> None:
    # Prepare
    state = tmp_path / "site"
    _publish(ModelStore(state / "models", key=state_key), tmp_path / "o", signing_key, 1)
    _charge(state, state_key)
    _audit(state / "audit", state_key, 2)
    wrong = tmp_path / "wrong.key"
    StateKey.generate().save(wrong)
    loose = tmp_path / "loose.key"
    StateKey.generate().save(loose)
    loose.chmod(0o644)
    cases = [
        ["models", "list", "--model-store", str(state / "models")],
        ["models", "list", "--model-store", str(state / "models"), "--state-key", str(wrong)],
        ["audit", "summary", str(state / "audit")],
        ["privacy", "show", str(state), "--state-key", str(wrong)],
        [
            "predict",
            "--model-store",
            str(state / "models"),
            "--input",
            "x.csv",
            "--output",
            "y.csv",
            "--state-key",
            str(loose),
        ],
        ["keys", "init-site-key", str(state_key.path)],
    ]
    for argv in cases:
        # Execute
        code = cli_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        # Assert
        assert code == 2, argv
        assert len(err) == 2 and err[0].startswith(f"fedinfer {argv[0]}: error: "), err
        assert "Traceback" not in err[0] and err[1].startswith("Try 'fedinfer")
    # and the positive twins
    assert (
        cli_main(
            [
                "models",
                "list",
                "--model-store",
                str(state / "models"),
                "--state-key",
                str(state_key.path),
            ]
        )
        == 0
    )
    assert "v1" in capsys.readouterr().out
    assert (
        cli_main(
            ["audit", "summary", str(state / "audit"), "--json", "--state-key", str(state_key.path)]
        )
        == 0
    )
    assert '"lab"' in capsys.readouterr().out


def test_cli_init_site_key_writes_a_private_key_outside_the_state(tmp_path: Path, capsys) -> None:
    assert cli_main(["keys", "init-site-key", str(tmp_path / "k" / "site.key")]) == 0
    assert (tmp_path / "k" / "site.key").stat().st_mode & 0o777 == 0o600
    assert "back it up" in capsys.readouterr().out
    inside = [
        "keys",
        "init-site-key",
        str(tmp_path / "s" / "a.key"),
        "--state-dir",
        str(tmp_path / "s"),
    ]
    assert cli_main(inside) == 2 and not (tmp_path / "s" / "a.key").exists()


# ------------------------------------------------------------- migration and rotation
def _plaintext_site(tmp_path: Path, signing_key) -> Path:
    state = tmp_path / "site"
    _publish(ModelStore(state / "models"), tmp_path / "o", signing_key, 1, 2)
    _charge(state, None)
    _audit(state / "audit", None, 30, max_bytes=1500)
    (state / ".incoming-old").mkdir()  # what an older fedinfer left behind: plaintext
    (state / ".incoming-old" / MANIFEST_FILE).write_text('{"weights_sha256": "..."}')
    return state


def test_encrypt_state_then_rekey_through_the_cli(tmp_path: Path, signing_key, capsys) -> None:
    # Prepare
    state = _plaintext_site(tmp_path, signing_key)
    assert plaintext_hits(state)
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    StateKey.generate().save(old)
    StateKey.generate().save(new)
    # Execute: encrypt the plaintext state, then rotate its key
    assert cli_main(["keys", "encrypt-state", str(state), "--state-key", str(old)]) == 0
    assert plaintext_hits(state) == []
    assert (
        cli_main(["keys", "rekey", str(state), "--old-key", str(old), "--new-key", str(new)]) == 0
    )
    # Assert
    key = StateKey.load(new)
    assert "rewritten" in capsys.readouterr().out
    assert plaintext_hits(state) == [] and read_marker(state)["key_id"] == key.key_id
    assert ModelStore(state / "models", key=key).load(2)[1].version == 2
    assert PrivacyLedger.read(state, key=key).epsilon > 0
    assert summarize_audit(state / "audit", key=key)[0].requests == 30
    with pytest.raises(StateKeyError, match="not with key id"):
        PrivacyLedger.read(state, key=StateKey.load(old))


def test_an_interrupted_rekey_is_refused_until_rerun(
    tmp_path: Path, signing_key, monkeypatch
) -> None:
    """Crash after a few files: the state is refused (marker), the same call finishes it."""
    import fedinfer.artifacts.store as store_module

    # Prepare
    state = _plaintext_site(tmp_path, signing_key)
    old, new = StateKey.generate(), StateKey.generate()
    reseal_state_dir(state, old=None, new=old)
    real, calls = store_module.reseal_file, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies here
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "reseal_file", crashing)
    # Execute
    with pytest.raises(KeyboardInterrupt):
        reseal_state_dir(state, old=old, new=new)
    monkeypatch.setattr(store_module, "reseal_file", real)
    # Assert
    with pytest.raises(StateKeyError, match="interrupted; rerun"):
        PrivacyLedger.read(state, key=new)
    with pytest.raises(StateKeyError, match="half-way"):
        reseal_state_dir(state, old=old, new=StateKey.generate())
    reseal_state_dir(state, old=old, new=new)
    assert ModelStore(state / "models", key=new).load()[1].version == 2
    assert PrivacyLedger.read(state, key=new).epsilon > 0
    assert summarize_audit(state / "audit", key=new)[0].requests == 30
    assert plaintext_hits(state) == []


def test_migration_refuses_a_state_a_running_server_writes(tmp_path: Path, state_key) -> None:
    from fedinfer.errors import ServingError

    log = AuditLog(tmp_path / "site" / "audit", key=state_key)  # what a running server holds
    try:
        with pytest.raises(ServingError, match="running server"):
            reseal_state_dir(tmp_path / "site", old=state_key, new=StateKey.generate())
    finally:
        log.close()
    assert os.listdir(tmp_path / "site") == ["audit"]


# --------------------------------------------------------------------------- simulation
def test_a_simulation_encrypts_its_sites_when_the_environment_names_a_key(
    tmp_path: Path, state_key, monkeypatch
) -> None:
    from conftest import tiny_config

    from fedinfer.simulation import run_simulation

    # Prepare
    monkeypatch.setenv("FEDINFER_STATE_KEY_FILE", str(state_key.path))
    # Execute
    run_simulation(tiny_config("privacy=dpsgd", "federation.rounds=1"), output_dir=tmp_path / "run")
    # Assert
    sites = sorted((tmp_path / "run" / "sites").iterdir())
    assert len(sites) == 4
    for site in sites:
        assert ModelStore(site / "models", key=state_key).current_version() is not None
        assert PrivacyLedger.read(site, key=state_key).epsilon > 0
        assert plaintext_hits(site) == []


def test_fedinfer_site_refuses_a_bad_key_before_starting_anything(
    tmp_path: Path, state_key, capsys
) -> None:
    # Prepare: the files `fedinfer site` checks, and a state that is still plaintext
    for name in ("data.npz", "ca.crt", "coordinator.pub", "node.key"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "node.key").chmod(0o600)
    state = tmp_path / "state"
    _charge(state, None)
    StateKey.generate().save(state / "inside.key")
    base = ["site", "--name", "a", "--data", str(tmp_path / "data.npz"), "--state-dir",
            str(state), "--coordinator", "127.0.0.1:1", "--ca", str(tmp_path / "ca.crt"),
            "--key", str(tmp_path / "node.key")]  # fmt: skip
    cases = {
        str(state / "inside.key"): "lies inside",
        str(state_key.path): "is plaintext; encrypt the state first: `fedinfer keys encrypt-state",
    }
    for key_file, message in cases.items():
        # Execute
        code = cli_main([*base, "--state-key", key_file])
        err = capsys.readouterr().err.strip().splitlines()
        # Assert
        assert code == 2 and len(err) == 2 and message in err[0], err
    assert not (state / "logs").exists() and not (state / "at-rest.json").exists()


def test_fedinfer_site_refuses_plaintext_secure_aggregation_state_under_a_key(
    tmp_path: Path, state_key, capsys
) -> None:
    """A site whose only plaintext state is its secure-aggregation identity and run files
    (it took part in secagg rounds before encryption was on) is refused before it starts,
    not in the middle of a round when the first sealed read fails."""
    from fedinfer.secagg.store import RunStateStore, open_site

    # Prepare
    for name in ("data.npz", "ca.crt", "coordinator.pub", "node.key"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "node.key").chmod(0o600)
    state = tmp_path / "state"
    plain = RunStateStore(state, key=None)
    plain.identity_public()
    site, _ = open_site(plain, site_id=1, run_id=5)
    plain.save(5, site.to_state())
    argv = ["site", "--name", "a", "--data", str(tmp_path / "data.npz"), "--state-dir",
            str(state), "--coordinator", "127.0.0.1:1", "--ca", str(tmp_path / "ca.crt"),
            "--key", str(tmp_path / "node.key"), "--state-key", str(state_key.path)]  # fmt: skip
    # Execute
    code = cli_main(argv)
    err = capsys.readouterr().err
    # Assert
    assert code == 2, err
    assert "identity.key" in err and "run-5.json" in err and "is plaintext" in err
    assert not (state / "logs").exists()


def test_encrypt_state_and_rekey_keep_the_secagg_identity_and_replay_guard(
    tmp_path: Path,
) -> None:
    """The site's secure-aggregation identity (which its peers list) and its per-run replay
    guard survive `keys encrypt-state` and `keys rekey`: sealed with the new key, same keys."""
    from fedinfer.secagg.store import RunStateStore, open_site

    # Prepare: a plaintext site that set up a run
    state = tmp_path / "site"
    plain = RunStateStore(state, key=None)
    identity = plain.identity_public()
    site, _ = open_site(plain, site_id=7, run_id=3)
    plain.save(3, site.to_state())
    old, new = StateKey.generate(), StateKey.generate()
    # Execute
    first = reseal_state_dir(state, old=None, new=old)
    second = reseal_state_dir(state, old=old, new=new)
    # Assert
    assert first.secagg == second.secagg == 2
    sealed = RunStateStore(state, key=new)
    assert sealed.identity_public() == identity
    assert sealed.load(3)["site_id"] == 7
    for path in (state / "secagg").glob("*.json"):
        assert is_sealed(path.read_bytes())
    assert is_sealed((state / "secagg" / "identity.key").read_bytes())
