"""The site policy: strict parsing, the checks, and a lying coordinator refused by every site."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedinfer.config import FedInferConfig
from fedinfer.data import SiteData
from fedinfer.data.datasets import ArrayDataset
from fedinfer.errors import ConfigError, PolicyViolation
from fedinfer.fl.client_app import build_client_app
from fedinfer.fl.grid import InProcessGrid
from fedinfer.fl.messages import ErrorCodes, Keys
from fedinfer.fl.records import weights_to_arrays
from fedinfer.fl.run_config import from_run_config, to_run_config
from fedinfer.fl.site import SiteEnv
from fedinfer.policy import (
    SitePolicy,
    check_evaluate,
    check_secagg_round,
    check_train,
    load_policy,
    release_metrics,
    save_policy,
)
from fedinfer.simulation import run_simulation
from tests.conftest import tiny_config

# --------------------------------------------------------------------------- the file


def test_policy_file_round_trips(tmp_path: Path) -> None:
    """What is saved is loaded back exactly; None values are simply absent from the file."""
    policy = SitePolicy(max_epsilon=4.0, delta=1e-6, allowed_metrics=["epsilon", "delta"])
    path = save_policy(policy, tmp_path / "site_policy.toml")
    assert load_policy(path) == policy
    assert "coordinator_key_fingerprint" not in path.read_text()
    assert path.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("max_epsilon = 4.0\nmax_epsilonn = 1.0\n", "`max_epsilonn`"),
        ('max_epsilon = "ten"\n', "`max_epsilon`"),
        ("require_secagg = 1\n", "`require_secagg`"),
        ('privacy_mode = "weak"\n', "`privacy_mode`"),
        ("max_epsilon = -1.0\n", "`max_epsilon`"),
        ("secagg_min_threshold = 3\n", "`secagg_min_threshold`"),
        ("allowed_metrics = [1]\n", "`allowed_metrics`"),
        ("max_epsilon = \n", "not valid TOML"),
    ],
    ids=["unknown", "string", "int-for-bool", "mode", "negative", "threshold", "list", "toml"],
)
def test_bad_policy_file_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "site_policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named.replace("`", "`?")):
        load_policy(path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedinfer", "site", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_init_policy_writes_the_strict_default_once(tmp_path: Path) -> None:
    done = _cli("init-policy", str(tmp_path / "state"))
    assert done.returncode == 0, done.stderr
    path = tmp_path / "state" / "site_policy.toml"
    assert str(path) in done.stdout
    assert load_policy(path) == SitePolicy()
    again = _cli("init-policy", str(tmp_path / "state"))
    assert again.returncode == 2
    assert len(again.stderr.strip().splitlines()) <= 2 and "exists" in again.stderr


def test_init_policy_pins_the_coordinator_key(tmp_path: Path) -> None:
    from fedinfer.artifacts import generate_signing_key, key_fingerprint, save_public_key

    key = generate_signing_key()
    public = save_public_key(key, tmp_path / "coordinator.pub")
    done = _cli("init-policy", str(tmp_path / "s"), f"--coordinator-public-key={public}")
    assert done.returncode == 0, done.stderr
    pinned = load_policy(tmp_path / "s" / "site_policy.toml").coordinator_key_fingerprint
    assert pinned == key_fingerprint(key.public_key())


def test_site_with_bad_policy_file_is_a_one_line_error(tmp_path: Path) -> None:
    from fedinfer.artifacts import generate_signing_key, save_public_key

    save_public_key(generate_signing_key(), tmp_path / "coordinator.pub")
    policy = tmp_path / "policy.toml"
    policy.write_text("max_epsilon = 4.0\nnoise = 1.0\n")
    (tmp_path / "site.npz").write_bytes(b"")  # never opened: the policy is refused first
    args = (
        "--no-serve",
        f"--coordinator-public-key={tmp_path / 'coordinator.pub'}",
        "--name=a",
        f"--data={tmp_path / 'site.npz'}",
        f"--state-dir={tmp_path / 's'}",
        "--coordinator=127.0.0.1:1",
        f"--ca={tmp_path}",
        f"--key={tmp_path}",
        f"--policy={policy}",
    )
    done = _cli(*args)
    assert done.returncode == 2
    first = done.stderr.strip().splitlines()[0]
    assert "unknown key `noise`" in first and "Traceback" not in done.stderr
    save_policy(SitePolicy(coordinator_key_fingerprint="00" * 16), policy, overwrite=True)
    done = _cli(*args)
    assert done.returncode == 2
    assert "`coordinator_key_fingerprint` pins" in done.stderr.strip().splitlines()[0]


# --------------------------------------------------------------------------- trusted peers


def test_peers_file_is_read_next_to_the_policy(tmp_path: Path) -> None:
    """``secagg_trusted_peers`` names a file relative to the policy; its keys are trusted."""
    from fedinfer.policy import load_peers, save_peers, trusted_identities

    peers = {"a": b"\x01" * 32, "hospital b": b"\x02" * 32}
    save_peers(peers, tmp_path / "site" / "secagg_peers.toml")
    path = save_policy(
        SitePolicy(secagg_trusted_peers="secagg_peers.toml"), tmp_path / "site" / "policy.toml"
    )
    policy = load_policy(path)
    assert policy.secagg_trusted_peers == str(tmp_path / "site" / "secagg_peers.toml")
    assert load_peers(Path(policy.secagg_trusted_peers)) == peers
    assert trusted_identities(policy) == set(peers.values())
    assert trusted_identities(SitePolicy()) is None


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (None, "does not exist"),
        ('a = "00"\n', "`a` must be a 32-byte key"),
        ("a = 1\n", "`a` must be a 32-byte key"),
        ("", "lists no peer"),
        (f'a = "{"ab" * 32}"\nb = "{"AB" * 32}"\n', "`a` and `b` have the same key"),
        ('a = "\n', "not valid TOML"),
    ],
    ids=["missing", "short", "not-a-string", "empty", "same-key-twice", "toml"],
)
def test_bad_peers_file_names_the_policy_key(tmp_path: Path, text: str | None, named: str) -> None:
    """A bad peers file stops the policy from loading, naming ``secagg_trusted_peers``."""
    if text is not None:
        (tmp_path / "peers.toml").write_text(text)
    (tmp_path / "site_policy.toml").write_text('secagg_trusted_peers = "peers.toml"\n')
    with pytest.raises(ConfigError, match="`secagg_trusted_peers`") as caught:
        load_policy(tmp_path / "site_policy.toml")
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_site_identity_prints_the_line_its_peers_trust(tmp_path: Path) -> None:
    """`fedinfer site identity` creates the key once and prints a peers-file line for it."""
    from fedinfer.crypto.at_rest import StateKey, is_sealed, mark_state_dir
    from fedinfer.policy import load_peers
    from fedinfer.secagg.store import RunStateStore

    # Execute
    first, again = (_cli("identity", str(tmp_path / "s"), "--name=hospital-a") for _ in "12")
    # Assert
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout and first.stdout.startswith("hospital-a = ")
    (tmp_path / "peers.toml").write_text(first.stdout)
    public = RunStateStore(tmp_path / "s", key=None).identity_public()
    assert load_peers(tmp_path / "peers.toml") == {"hospital-a": public}
    assert "fingerprint" in first.stderr
    # an encrypted state directory without its key: one line, and no new identity
    key = StateKey.generate()
    key.save(tmp_path / "k.key")
    mark_state_dir(tmp_path / "enc", key)
    refused = _cli("identity", str(tmp_path / "enc"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert not (tmp_path / "enc" / "secagg").exists()
    sealed = _cli("identity", str(tmp_path / "enc"), f"--state-key={tmp_path / 'k.key'}")
    assert sealed.returncode == 0, sealed.stderr
    assert sealed.stdout.startswith("enc = ")
    assert is_sealed((tmp_path / "enc" / "secagg" / "identity.key").read_bytes())


def test_site_start_warns_when_the_policy_names_no_peers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedinfer site` says once, at start-up, that a policy without peers accepts Sybils."""
    import argparse

    from fedinfer.deploy.commands import _warn_without_peers
    from fedinfer.policy import save_peers

    save_policy(SitePolicy(), tmp_path / "site_policy.toml")
    ns = argparse.Namespace(name="a", policy=None, state_dir=tmp_path)
    _warn_without_peers(ns)
    assert "warning" in capsys.readouterr().out
    save_peers({"a": b"\x01" * 32}, tmp_path / "peers.toml")
    save_policy(
        SitePolicy(secagg_trusted_peers="peers.toml"), tmp_path / "site_policy.toml", overwrite=True
    )
    _warn_without_peers(ns)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- the checks

BASE = tiny_config()  # the default job (dpsgd, target epsilon 8, secure aggregation), tiny
N = 2000


def _with(cfg: FedInferConfig, **groups: dict[str, object]) -> FedInferConfig:
    changed = {name: dataclasses.replace(getattr(cfg, name), **v) for name, v in groups.items()}
    return dataclasses.replace(cfg, **changed)


def test_strict_policy_accepts_the_default_job() -> None:
    check_train(SitePolicy(), BASE, num_samples=N)
    check_secagg_round(SitePolicy(), threshold=6, participants=10)


LIES = {
    "privacy-none": (dict(privacy={"mode": "none"}), "privacy_mode"),
    "central": (dict(privacy={"mode": "central"}), "privacy_mode"),
    "huge-budget": (
        dict(privacy={"noise_multiplier": 0.05, "target_epsilon": None, "max_epsilon": 1e9}),
        "max_epsilon",
    ),
    "target-over-budget": (dict(privacy={"target_epsilon": 50.0}), "max_epsilon"),
    "little-noise": (
        dict(privacy={"noise_multiplier": 0.05, "target_epsilon": None}),
        "min_noise_multiplier",
    ),
    "no-poisson": (dict(privacy={"poisson_sampling": False}), "require_poisson_sampling"),
    "weak-delta": (dict(privacy={"delta": 0.01}), "delta"),
    "many-epochs": (dict(federation={"local_epochs": 50}), "max_local_epochs"),
    "secagg-off": (dict(secagg={"enabled": False}), "require_secagg"),
}


@pytest.mark.parametrize(("groups", "key"), list(LIES.values()), ids=list(LIES))
def test_lying_request_is_refused_naming_the_key(groups: dict, key: str) -> None:
    with pytest.raises(PolicyViolation, match=f"^policy {key}:") as info:
        check_train(SitePolicy(), _with(BASE, **groups), num_samples=N)
    assert info.value.key == key


def test_step_and_sample_rate_limits() -> None:
    with pytest.raises(PolicyViolation, match="^policy max_sample_rate:"):
        check_train(SitePolicy(max_sample_rate=0.01), BASE, num_samples=N)
    with pytest.raises(PolicyViolation, match="^policy max_steps_per_round:"):
        check_train(SitePolicy(max_steps_per_round=3), BASE, num_samples=N)


@pytest.mark.parametrize(
    ("threshold", "participants", "key"),
    [
        (2, 10, "secagg_min_threshold"),
        (4, 10, "secagg_min_threshold"),
        (2, 2, "secagg_min_participants"),
    ],
    ids=["t2-of-10", "t4-of-10", "two-sites"],
)
def test_low_secagg_threshold_is_refused(threshold: int, participants: int, key: str) -> None:
    with pytest.raises(PolicyViolation, match=f"^policy {key}:"):
        check_secagg_round(SitePolicy(), threshold=threshold, participants=participants)


@pytest.mark.parametrize("fraction", [0.0, 0.5], ids=["open", "strict"])
@pytest.mark.parametrize(
    ("threshold", "participants"), [(1, 2), (2, 4), (3, 6), (5, 10)], ids=["1of2", "2of4", "3of6", "5of10"]
)
def test_a_threshold_of_half_the_participants_is_refused(
    fraction: float, threshold: int, participants: int
) -> None:
    """Two disjoint halves could each reach the threshold: the floor is above n / 2, whatever
    the policy's fraction (the consistency check rests on it)."""
    policy = SitePolicy(secagg_min_threshold=fraction, secagg_min_participants=2)
    with pytest.raises(PolicyViolation, match="^policy secagg_min_threshold:"):
        check_secagg_round(policy, threshold=threshold, participants=participants)
    check_secagg_round(policy, threshold=threshold + 1, participants=participants)


def test_the_policy_fraction_is_a_minimum_share_of_the_participants() -> None:
    policy = SitePolicy(secagg_min_threshold=0.75)
    check_secagg_round(policy, threshold=3, participants=4)  # 3 >= 0.75 x 4
    with pytest.raises(PolicyViolation, match="^policy secagg_min_threshold:"):
        check_secagg_round(policy, threshold=3, participants=5)  # 3 < 0.75 x 5


def test_evaluation_is_refused_in_dp_mode_unless_allowed() -> None:
    with pytest.raises(PolicyViolation, match="^policy allow_evaluation:"):
        check_evaluate(SitePolicy(), BASE)
    check_evaluate(SitePolicy(allow_evaluation=True), BASE)
    check_evaluate(SitePolicy(privacy_mode="none"), _with(BASE, privacy={"mode": "none"}))


def test_only_allowed_metrics_leave_and_counts_never_with_secagg() -> None:
    metrics = {"num-examples": 2000.0, "train-loss": 0.3, "train-accuracy": 0.9, "epsilon": 1.5}
    assert release_metrics(SitePolicy(), BASE, metrics) == {"epsilon": 1.5, "num-examples": 1.0}
    allow_all = SitePolicy(allowed_metrics=list(metrics))
    assert release_metrics(allow_all, BASE, metrics)["num-examples"] == 1.0, "secagg is on"
    no_secagg = _with(BASE, secagg={"enabled": False})
    assert release_metrics(allow_all, no_secagg, metrics) == metrics
    plain = _with(no_secagg, privacy={"mode": "none"})
    assert release_metrics(SitePolicy(), plain, metrics) == metrics, "no DP: nothing to protect"


def test_a_bad_simulated_site_policy_fails_before_the_run() -> None:
    from fedinfer.config import validate_config

    with pytest.raises(ConfigError, match="site_policy: `privacy_mode`"):
        validate_config(tiny_config("site_policy.privacy_mode=weak"))


def test_the_coordinator_cannot_send_a_site_policy() -> None:
    """The run config never carries ``site_policy``, and one slipped into it is ignored."""
    lax = dataclasses.replace(BASE, site_policy=SitePolicy(privacy_mode="none"))
    flat = to_run_config(lax)
    assert not [k for k in flat if k.startswith("site_policy")]
    flat["site_policy.privacy-mode"] = "none"
    assert from_run_config(flat).site_policy == SitePolicy()


# --------------------------------------------------------------------------- the ClientApp


def _site_data(x: np.ndarray, y: np.ndarray) -> SiteData:
    data = ArrayDataset(x.astype(np.float32), y.astype(np.int64), num_classes=10)
    return SiteData(site_id="site-x", train=data, val=data, test=data)


def _train_message(weights: dict[str, np.ndarray]) -> RecordDict:
    return RecordDict(
        {
            Keys.ARRAYS: weights_to_arrays(weights),
            Keys.CONFIG: ConfigRecord({Keys.SERVER_ROUND: 1, Keys.RUN_ID: "attack"}),
        }
    )


def _membership_replies(tmp_path: Path, policy: str) -> list[dict[str, float]]:
    """A curious coordinator's crafted logreg, lr ~ 0, sent to a member and a non-member site.

    The model predicts the target's label only near the target, class 0 (no record has it)
    everywhere else: a site's train-accuracy is > 0 exactly when the target is in its data.
    """
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 40))
    y = rng.integers(1, 10, size=50)
    target_x, target_y = rng.normal(size=40), 3
    sites = [
        _site_data(np.vstack([x, target_x]), np.append(y, target_y)),  # member
        _site_data(np.vstack([x, rng.normal(size=40)]), np.append(y, 4)),  # non-member
    ]
    cfg = tiny_config(
        "model=logreg",
        "secagg=off",
        f"site_policy={policy}",
        "federation.lr=1e-9",
        "federation.momentum=0",
        "federation.batch_size=64",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
    )

    def resolver(c: FedInferConfig) -> Callable[[Context], SiteEnv]:
        def resolve(context: Context) -> SiteEnv:
            index = int(context.node_config["partition-id"])
            return SiteEnv(f"site-{index}", tmp_path / f"s{index}", sites[index], None)

        return resolve

    app = build_client_app(config_fn=lambda context: cfg, resolver_fn=resolver)
    grid = InProcessGrid(app, num_nodes=2, run_id=1, seed=0)
    weight = np.zeros((10, 40), dtype=np.float32)
    weight[target_y] = 10 * target_x / np.dot(target_x, target_x)
    bias = np.zeros(10, dtype=np.float32)
    bias[target_y] = -9.5
    crafted = {"0.weight": weight, "0.bias": bias}
    order = sorted(grid.get_node_ids(), key=lambda n: grid._contexts[n].node_config["partition-id"])
    messages = [Message(_train_message(crafted), node, "train") for node in order]
    replies = list(grid.send_and_receive(messages))
    errors = [r.error.reason for r in replies if r.has_error()]
    assert not errors, errors
    return [dict(next(iter(r.content.metric_records.values()))) for r in replies]


def test_membership_attack_through_train_metrics(tmp_path: Path) -> None:
    """Attack: with every metric released (the old code; policy ``open``), train-accuracy is a
    membership test. With the default policy the metric and the exact count never leave."""
    member, other = _membership_replies(tmp_path / "open", "open")
    assert member["train-accuracy"] > 0 and other["train-accuracy"] == 0, "the attack works"
    assert member["num-examples"] == 51
    member, other = _membership_replies(tmp_path / "default", "experiment")
    assert set(member) == set(other) == {"epsilon", "num-examples"}
    assert member["num-examples"] == other["num-examples"] == 1.0


# --------------------------------------------------------------------------- a lying coordinator

LYING_RUNS = {
    "privacy-none": (["privacy=none"], "privacy_mode"),
    "little-noise-huge-budget": (
        ["privacy.target_epsilon=null", "privacy.noise_multiplier=0.05", "privacy.max_epsilon=1e9"],
        "max_epsilon",
    ),
    "secagg-off": (["secagg=off"], "require_secagg"),
    "low-threshold": (["federation.num_sites=6", "secagg.threshold=2"], "secagg_min_threshold"),
    # Two disjoint halves of 4 could each unmask a sum: the floor is strictly above n / 2.
    "half-threshold": (["secagg.threshold=2"], "secagg_min_threshold"),
}


def test_the_ledger_accounts_at_the_sites_delta(out_dir: Path) -> None:
    """The request leaves delta to the site (null); the site's policy delta is what is charged."""
    cfg = tiny_config("secagg=off", "federation.rounds=1", "site_policy.delta=1e-6")
    run_simulation(cfg, output_dir=out_dir)
    ledgers = [json.loads(p.read_text()) for p in (out_dir / "sites").glob("*/ledger.json")]
    assert len(ledgers) == 4
    assert all(ledger["delta"] == pytest.approx(1e-6) for ledger in ledgers)


@pytest.mark.parametrize(("lie", "key"), list(LYING_RUNS.values()), ids=list(LYING_RUNS))
def test_every_site_refuses_a_lying_coordinator(out_dir: Path, lie: list[str], key: str) -> None:
    """The coordinator's config lies; each simulated site holds the strict policy and refuses."""
    run_simulation(tiny_config("site_policy=strict", *lie), output_dir=out_dir)
    data = json.loads((out_dir / "results.json").read_text())
    first = data["rounds"][0]
    num_sites = data["config"]["federation"]["num_sites"]
    assert first["sites"] == {} and not first["aggregated"]
    assert sorted(first["refused"]) == [f"site-{i:02d}" for i in range(num_sites)]
    assert all(reason.startswith(f"policy {key}:") for reason in first["refused"].values())
    assert data["status"] == "stopped" and f"policy {key}" in data["stop_reason"]
    assert "model_version" not in data or data["model_version"] is None
    assert not list((out_dir / "sites").glob("*/ledger.json")), "no site touched its data"


def test_the_sites_policy_not_the_run_config_sets_the_secagg_floor(out_dir: Path) -> None:
    """Two sites, secure aggregation on. Whether a site takes part is its policy's call alone:
    the coordinator's run config carries no floor of its own that a site would obey.
    (A policy floor of 3 with 2 sites is refused before the run starts, see
    test_simulation; the site's own refusal of a lowered threshold is in test_secagg_attacks.)"""
    cfg = tiny_config(
        "federation.num_sites=2",
        "federation.rounds=1",
        "site_policy.secagg_min_participants=2",
    )
    run_simulation(cfg, output_dir=out_dir)
    first = json.loads((out_dir / "results.json").read_text())["rounds"][0]
    assert first["aggregated"] and not first["refused"] and len(first["sites"]) == 2


def test_a_policy_floor_no_round_can_meet_stops_before_any_site_trains(out_dir: Path) -> None:
    cfg = tiny_config(
        "federation.num_sites=2",
        "federation.rounds=1",
        "site_policy.secagg_min_participants=3",
    )
    with pytest.raises(ConfigError, match=r"site_policy.secagg_min_participants`=3"):
        run_simulation(cfg, output_dir=out_dir)
    assert not (out_dir / "results.json").exists()


class CountingGrid(InProcessGrid):
    """Counts the messages of each type the coordinator sends."""

    sent: dict[str, int]

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        self.sent = dict(getattr(self, "sent", {}))
        for msg in messages:
            kind = msg.metadata.message_type
            self.sent[kind] = self.sent.get(kind, 0) + 1
            if kind == "train" and Keys.EVALUATE in msg.content.config_records:
                self.sent["train+evaluate"] = self.sent.get("train+evaluate", 0) + 1
        return super().push_messages(messages)


def test_strict_sites_accept_the_default_job_and_withhold_metrics(
    out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedinfer.simulation import run as sim_run

    grids: list[CountingGrid] = []
    monkeypatch.setattr(
        sim_run, "InProcessGrid", lambda *a, **k: grids.append(CountingGrid(*a, **k)) or grids[-1]
    )
    run_simulation(tiny_config("site_policy=strict", "federation.rounds=2"), output_dir=out_dir)
    data = json.loads((out_dir / "results.json").read_text())
    for record in data["rounds"]:
        assert record["aggregated"] and len(record["sites"]) == 4 and not record["refused"]
        for metrics in record["sites"].values():
            assert set(metrics) == {"epsilon", "num-examples"} and metrics["num-examples"] == 1.0
        assert record["federated"] == {}, "evaluation is refused in DP mode by default"
    # Round 1's evaluation rides on round 2's train messages; refused there, round 2's own
    # evaluate exchange (the last round's) asks nobody.
    assert grids[0].sent.get("evaluate", 0) == 0 and grids[0].sent["train"] == 8
    assert grids[0].sent["train+evaluate"] == 4, "refused once, then not asked again"


def test_every_site_refuses_a_lying_coordinator_on_ray(out_dir: Path) -> None:
    """The same refusal through Flower's simulation runtime (Ray), one site per actor."""
    cfg = tiny_config("site_policy=strict", "privacy=none", "simulation.runtime=ray")
    run_simulation(cfg, output_dir=out_dir)
    data = json.loads((out_dir / "results.json").read_text())
    refused = data["rounds"][0]["refused"]
    assert len(refused) == 4
    assert all(r.startswith("policy privacy_mode:") for r in refused.values())
    assert data["status"] == "stopped"


def test_a_pinned_coordinator_key_refuses_another(tmp_path: Path) -> None:
    from fedinfer.artifacts import generate_signing_key, save_public_key
    from fedinfer.fl.client_app import accept_artifact

    public = save_public_key(generate_signing_key(), tmp_path / "signing.pub")
    data = _site_data(np.zeros((2, 4)), np.array([1, 2]))
    env = SiteEnv("site-x", tmp_path / "state", data, public)
    with pytest.raises(PolicyViolation, match="^policy coordinator_key_fingerprint:"):
        accept_artifact(
            env, ConfigRecord({}), policy=SitePolicy(coordinator_key_fingerprint="00" * 16)
        )


def test_error_code_is_the_policy_code() -> None:
    assert ErrorCodes.POLICY_REFUSED == 4006


# --------------------------------------------------------------------------- issue 14.5: fed-acc


def test_federated_accuracy_is_the_pooled_accuracy_so_the_table_drops_it(out_dir: Path) -> None:
    """Why ``fed-acc`` always equalled ``acc``: the pooled test split is the union of the sites'
    test splits, so the sample-weighted site evaluation is the same number. The table shows one."""
    import io

    from rich.console import Console

    from fedinfer.fl.loop import RoundRecord
    from fedinfer.reporting.progress import RoundPrinter

    cfg = tiny_config("privacy=none", "secagg=off", "federation.rounds=1")
    run_simulation(cfg, output_dir=out_dir)
    first = json.loads((out_dir / "results.json").read_text())["rounds"][0]
    assert first["federated"]["eval-accuracy"] == pytest.approx(first["accuracy"], abs=1e-9)
    out = io.StringIO()
    printer = RoundPrinter(num_rounds=2, console=Console(file=out, width=120))
    printer.line(RoundRecord(round=1, accuracy=0.5, federated={"eval-accuracy": 0.5}))
    printer.line(RoundRecord(round=2, federated={"eval-accuracy": 0.625}))  # a deployment
    text = out.getvalue()
    assert "fed-acc" not in text and "0.6250*" in text


def test_a_deployed_site_reads_its_policy_from_its_node_config(tmp_path: Path) -> None:
    """The policy comes from the site's own node config (or state dir), never the run config."""
    from fedinfer.fl.client_app import node_policy

    def context(node: dict[str, str]) -> Context:
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    path = save_policy(SitePolicy(max_epsilon=3.0), tmp_path / "elsewhere.toml")
    assert node_policy(BASE, context({"policy-file": str(path)})).max_epsilon == 3.0
    save_policy(SitePolicy(max_epsilon=2.0), tmp_path / "site_policy.toml")
    assert node_policy(BASE, context({"state-dir": str(tmp_path)})).max_epsilon == 2.0
    with pytest.raises(ConfigError, match="init-policy"):
        node_policy(BASE, context({"state-dir": str(tmp_path / "empty")}))
    with pytest.raises(PolicyViolation, match="^policy policy_file:"):
        node_policy(BASE, context({}))


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("secagg=off", "privacy.max_epsilon=50", "federation.local_epochs=8"),
        ("privacy=none", "secagg.threshold=2"),
        ("privacy.target_epsilon=null", "privacy.noise_multiplier=0.3", "privacy.delta=1e-6"),
    ],
    ids=["default", "no-secagg-big-budget", "no-dp", "low-noise"],
)
def test_deploy_local_policy_accepts_its_own_run_and_nothing_weaker(overrides: tuple) -> None:
    from fedinfer.policy import policy_accepting

    cfg = tiny_config(*overrides)
    policy = policy_accepting(cfg, num_sites=2, coordinator_key_fingerprint="ab" * 16)
    check_train(policy, cfg, num_samples=N)
    if cfg.secagg.enabled:
        check_secagg_round(policy, threshold=2, participants=2)
    assert policy.allowed_metrics == ["epsilon"] and not policy.allow_evaluation
    assert policy.coordinator_key_fingerprint == "ab" * 16
    if cfg.privacy.mode == "dpsgd":
        with pytest.raises(PolicyViolation, match="^policy privacy_mode:"):
            check_train(policy, _with(cfg, privacy={"mode": "none"}), num_samples=N)
