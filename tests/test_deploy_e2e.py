"""A real deployment on loopback: SuperLink + 2 SuperNodes, TLS, node auth, DP, crash and resume.

Every process is real (``fedinfer coordinator`` / ``fedinfer site`` as the CLI
starts them, Flower's SuperLink and SuperNodes, the site workers that run
each site's own ClientApp, the Fleet gateway, the inference servers) and so is every fault: an
unregistered node key, a site that does not trust the CA, and the coordinator
killed with SIGKILL after round 1 and restarted with ``--resume``. One
deployment serves all assertions, in order, because each start costs seconds.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from at_rest_helpers import plaintext_hits
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedinfer.artifacts import ModelStore, load_public_key
from fedinfer.deploy.certs import init_pki
from fedinfer.deploy.local import LocalDeployment
from fedinfer.deploy.process import wait_until
from fedinfer.deploy.status import collect_status, render_status
from fedinfer.errors import StateKeyError
from fedinfer.fl.checkpoint import checkpoint_path
from fedinfer.privacy import PrivacyLedger

OVERRIDES = [
    "privacy=dpsgd",
    "model=logreg",
    "dataset.num_samples=1000",
    "federation.local_epochs=1",
    "federation.batch_size=64",
    "federation.round_timeout_s=300",
]
ROUNDS = 2
pytestmark = pytest.mark.timeout(900)


def _our_pids(marker: str) -> set[int]:
    """Processes whose environment mentions ``marker`` (every child of the deployment has it)."""
    pids = set()
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in env.read_bytes() and int(env.parent.name) != os.getpid():
                pids.add(int(env.parent.name))
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}/stat").exists()
        and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    )


@dataclass
class Scenario:
    """The deployment under test and what the fixtures did to it."""

    deployment: LocalDeployment
    overrides: list[str]
    killed_pids: list[int] = field(default_factory=list)


# The default run is the product's default: DP-SGD and secure aggregation on. The slow twin
# runs the same scenario without secure aggregation.
@pytest.fixture(
    scope="module",
    params=["secagg=on", pytest.param("secagg=off", marks=pytest.mark.slow)],
    ids=["dp-secagg", "dp"],
)
def scenario(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    workdir = tmp_path_factory.mktemp("deploy") / f"e2e-{os.getpid()}-{request.param}"
    os.environ["FEDINFER_E2E_MARKER"] = str(workdir)  # inherited by every child: finds orphans
    # Two sites: the operator accepts a secure-aggregation floor of 2 (deploy local refuses
    # fewer sites than site_policy.secagg_min_participants, default 3).
    overrides = [*OVERRIDES, request.param, "site_policy.secagg_min_participants=2"]
    deployment = LocalDeployment(workdir, num_sites=2, rounds=ROUNDS, overrides=overrides)
    try:
        yield Scenario(deployment, deployment.prepare())
    finally:
        deployment.stop()
        os.environ.pop("FEDINFER_E2E_MARKER", None)


@pytest.fixture(scope="module")
def crashed(scenario: Scenario) -> Scenario:
    """Coordinator and both sites up; round 1 checkpointed; then the coordinator is SIGKILLed."""
    deployment = scenario.deployment
    coordinator = deployment.start_coordinator(scenario.overrides)
    for name in deployment.names:
        deployment.start_site(name)
    wait_until(
        lambda: checkpoint_path(deployment.coordinator_dir / "output").exists(),
        timeout_s=600,
        what="round 1's checkpoint",
        interval_s=0.5,
        alive=coordinator.check_alive,
    )
    scenario.killed_pids = list(
        json.loads((deployment.coordinator_dir / "coordinator.json").read_text())["pids"].values()
    )
    assert coordinator.process is not None
    coordinator.process.send_signal(signal.SIGKILL)
    coordinator.process.wait()
    return scenario


@pytest.fixture(scope="module")
def resumed(crashed: Scenario) -> Scenario:
    """``fedinfer coordinator --resume`` on the same working directory.

    Kept alive after the federation ends: the tests of refused sites need its gateway up,
    however fast the remaining round runs.
    """
    crashed.deployment.start_coordinator(crashed.overrides, resume=True, keep_alive=True)
    return crashed


def test_killing_the_coordinator_takes_its_superlink_and_gateway_down(crashed: Scenario) -> None:
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in crashed.killed_pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert crashed.killed_pids and not any(_alive(pid) for pid in crashed.killed_pids)


def test_status_lists_the_online_sites_while_the_federation_runs(resumed: Scenario) -> None:
    """Right after the restart: the sites reconnect to the new SuperLink and show as online."""
    names = set(resumed.deployment.names)
    seen: dict[str, Any] = {}

    def all_online() -> bool:
        seen.update(collect_status(resumed.deployment.workdir)["coordinator"])
        return {n["site"] for n in seen["nodes"] or [] if n["status"] == "online"} == names

    wait_until(all_online, timeout_s=180, interval_s=2.0, what="both sites online")
    assert seen["processes"] == {"superlink": True, "gateway": True}


def test_a_node_with_an_unregistered_key_is_refused(resumed: Scenario, tmp_path: Path) -> None:
    # Prepare: the right CA, but a key the coordinator never registered
    key = ec.generate_private_key(ec.SECP384R1())
    rogue_key = tmp_path / "node.key"
    rogue_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    rogue_key.chmod(0o600)
    (tmp_path / "coordinator.pub").write_bytes(resumed.deployment.pki.signing_pub.read_bytes())
    # Execute
    rogue = resumed.deployment.start_site(
        "site-00",
        label="rogue",
        extra=[
            "--key",
            str(rogue_key),
            "--state-dir",
            str(tmp_path / "state"),
            "--no-serve",
            "--connect-attempts",
            "1",
        ],
    )
    assert rogue.process is not None
    code = rogue.process.wait(timeout=300)
    # Assert
    assert code == 2
    assert "Failed to activate" in rogue.log_file.read_text()


def test_a_site_that_does_not_trust_the_ca_refuses_to_connect(
    resumed: Scenario, tmp_path: Path
) -> None:
    # Prepare: site-01's registered key, but another deployment's CA
    other = init_pki(tmp_path / "other", hosts=["127.0.0.1"])
    # Execute
    stranger = resumed.deployment.start_site(
        "site-01",
        label="stranger",
        extra=[
            "--ca",
            str(other.ca_cert),
            "--state-dir",
            str(tmp_path / "state"),
            "--no-serve",
            "--connect-attempts",
            "1",
        ],
    )
    assert stranger.process is not None
    code = stranger.process.wait(timeout=300)
    # Assert
    assert code == 2
    assert "CERTIFICATE_VERIFY_FAILED" in stranger.log_file.read_text()


def test_resumed_federation_completes_and_publishes_a_signed_model_everywhere(
    resumed: Scenario,
) -> None:
    # Execute: the resumed coordinator runs round 2 and publishes
    deployment = resumed.deployment
    coordinator = deployment.coordinator
    assert coordinator is not None and coordinator.process is not None
    state_file = deployment.coordinator_dir / "coordinator.json"
    wait_until(
        lambda: str(json.loads(state_file.read_text()).get("status", "")).startswith("finished"),
        timeout_s=800,
        interval_s=0.5,
        what="the resumed federation to finish",
        alive=coordinator.check_alive,
    )
    assert json.loads(state_file.read_text())["status"] == "finished:completed"
    results = deployment.results()
    # Assert
    assert results["status"] == "completed"
    if "secagg=on" in resumed.overrides:
        assert all(r["secagg"]["survivors"] == len(deployment.names) for r in results["rounds"])
    assert [r["round"] for r in results["rounds"]] == list(range(1, ROUNDS + 1))
    assert "(resumed)" in coordinator.log_file.read_text()
    version = results["model_version"]
    assert results["deployed"] == dict.fromkeys(deployment.names, version)
    for name in deployment.names:
        store = ModelStore(deployment.site_dir(name) / "models", key=deployment.state_key(name))
        assert store.current_version() == version
        _, manifest = store.load(version, public_key=load_public_key(deployment.pki.signing_pub))
        assert manifest.server_round == ROUNDS and manifest.privacy["mode"] == "dpsgd"
        assert manifest.privacy["secure_aggregation"] == ("secagg=on" in resumed.overrides)
        answer = deployment.ask_site(name, expect_version=version)
        assert answer["outputs"][0]["shape"] == [4, 10]
        # Every message ran in the site's long-lived worker; the SuperNode ran no app code
        logs = deployment.site_dir(name) / "logs"
        worker_log = (logs / "worker.log").read_text()
        assert "train message" in worker_log and "query.deploy message" in worker_log
        assert not list((deployment.site_dir(name) / "flwr").glob("apps/*"))  # no FAB installed
        assert "flower-superexec" not in (logs / "supernode.log").read_text()


def test_sites_spent_privacy_and_keep_ledger_and_models_across_a_restart(resumed: Scenario) -> None:
    # Prepare
    deployment = resumed.deployment
    name = deployment.names[0]
    key = deployment.state_key(name)
    epsilon = PrivacyLedger.read(deployment.site_dir(name), key=key).epsilon
    version = ModelStore(deployment.site_dir(name) / "models", key=key).current_version()
    # Execute
    deployment.sites[name].stop()
    deployment.start_site(name)
    # Assert
    assert epsilon > 0
    assert PrivacyLedger.read(deployment.site_dir(name), key=key).epsilon == epsilon
    assert deployment.ask_site(name, expect_version=version)["model_version"] == str(version)


def test_site_state_is_encrypted_at_rest(resumed: Scenario) -> None:
    """After training, publication, serving and a restart: no plaintext state on disk."""
    for name in resumed.deployment.names:
        state = resumed.deployment.site_dir(name)
        # Assert: models, ledger and audit log (which now holds requests) are all sealed
        assert (state / "audit" / "audit.jsonl").stat().st_size > 0
        assert plaintext_hits(state, skip=("logs", "flwr")) == []
        with pytest.raises(StateKeyError, match="encrypted at rest"):
            PrivacyLedger.read(state, key=None)


def test_status_shows_rounds_and_site_servers(resumed: Scenario) -> None:
    deployment = resumed.deployment
    status = collect_status(deployment.workdir)
    assert status["coordinator"]["rounds_done"] == ROUNDS
    assert status["coordinator"]["run_status"] == "finished:completed"
    assert {s["site"] for s in status["sites"]} >= set(deployment.names)
    serving = [s for s in status["sites"] if s["site"] in deployment.names]
    assert all(s["server"] and s["server"]["ready"] for s in serving)
    assert all(s["model_version"] == status["coordinator"]["model_version"] for s in serving)
    text = render_status(status)
    assert f"rounds {ROUNDS}/{ROUNDS}" in text and "site site-00" in text and " ready" in text


def test_sigterm_leaves_no_process_behind(resumed: Scenario) -> None:
    # Execute
    resumed.deployment.stop()
    # Assert
    marker = os.environ["FEDINFER_E2E_MARKER"]
    deadline = time.monotonic() + 60
    while (left := {p for p in _our_pids(marker) if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [
        Path(f"/proc/{p}/cmdline").read_bytes()[:200]
        for p in left
        if Path(f"/proc/{p}/cmdline").exists()
    ]
