"""End-to-end federations: the real ServerApp/ClientApp code, in-process and on Flower's Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedinfer.artifacts import (
    ModelStore,
    generate_signing_key,
    load_public_key,
    read_weights,
    save_signing_key,
    verify_artifact,
)
from fedinfer.config import ModelConfig
from fedinfer.errors import ConfigError
from fedinfer.fl.grid import InProcessGrid
from fedinfer.fl.messages import Keys
from fedinfer.models import build_model
from fedinfer.secagg import quantization_bound
from fedinfer.simulation import run_simulation
from fedinfer.training import proximal_step_fn
from tests.artifact_factory import publish_versions
from tests.conftest import tiny_config


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_inprocess_run_writes_every_output(out_dir: Path) -> None:
    cfg = tiny_config(
        "privacy=none", "secagg=off", "federation.rounds=4", "dataset.num_samples=2000"
    )
    result = run_simulation(cfg, output_dir=out_dir)
    data = _results(out_dir)
    assert data["status"] == "completed"
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3, 4]
    for record in data["rounds"]:
        assert {"accuracy", "loss", "federated", "sites", "duration_s", "epsilon"} <= set(record)
        assert len(record["sites"]) == 4 and record["duration_s"] > 0
        assert 0 <= record["federated"]["eval-accuracy"] <= 1
    assert data["final_accuracy"] == result.final_accuracy
    assert result.final_accuracy > 0.2, "well above chance (0.1) on MNIST-1D"
    assert data["rounds"][-1]["loss"] < data["rounds"][0]["loss"]
    assert data["config"]["federation"]["num_sites"] == 4 and "flwr" in data["versions"]
    assert (out_dir / "accuracy.png").stat().st_size > 0
    manifest = verify_artifact(
        out_dir / "model", public_key=load_public_key(out_dir / "coordinator" / "signing.pub")
    )
    assert manifest.version == data["model_version"]
    for site in ("site-00", "site-01", "site-02", "site-03"):
        assert ModelStore(out_dir / "sites" / site / "models").current_version() == manifest.version


def test_same_seed_same_model(tmp_path: Path) -> None:
    cfg = tiny_config("privacy=none", "secagg=off")
    run_simulation(cfg, output_dir=tmp_path / "a")
    run_simulation(tiny_config("privacy=none", "secagg=off"), output_dir=tmp_path / "b")
    a = read_weights(
        tmp_path / "a" / "model",
        verify_artifact(
            tmp_path / "a" / "model",
            public_key=load_public_key(tmp_path / "a" / "coordinator" / "signing.pub"),
        ),
    )
    b = read_weights(
        tmp_path / "b" / "model",
        verify_artifact(
            tmp_path / "b" / "model",
            public_key=load_public_key(tmp_path / "b" / "coordinator" / "signing.pub"),
        ),
    )
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_rerun_in_the_same_output_dir_keeps_the_signing_key(out_dir: Path) -> None:
    """Every site store pinned run 1's key; run 2 in the same directory must sign with it."""
    # Prepare
    run_simulation(tiny_config("privacy=none", "secagg=off"), output_dir=out_dir)
    public_pem = (out_dir / "coordinator" / "signing.pub").read_bytes()
    # Execute
    second = run_simulation(tiny_config("privacy=none", "secagg=off"), output_dir=out_dir)
    # Assert: every site accepted and serves run 2's model
    assert (out_dir / "coordinator" / "signing.pub").read_bytes() == public_pem
    version = second.results["model_version"]
    assert version == 2
    for site in ("site-00", "site-01", "site-02", "site-03"):
        assert ModelStore(out_dir / "sites" / site / "models").current_version() == version


def _pin_site_store(out_dir: Path, key: Ed25519PrivateKey) -> None:
    publish_versions(out_dir / "sites" / "site-01", key, [1])  # -> sites/site-01/models


def test_rerun_without_the_pinned_key_is_refused_before_training(out_dir: Path) -> None:
    # Prepare: a site store pinned to a key the output directory does not hold
    _pin_site_store(out_dir, generate_signing_key())
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"pinned.*hydra\.run\.dir"):
        run_simulation(tiny_config("privacy=none", "secagg=off"), output_dir=out_dir)
    assert not (out_dir / "results.json").exists()
    assert not (out_dir / "coordinator" / "signing.key").exists()


def test_rerun_with_another_signing_key_names_the_sites(out_dir: Path) -> None:
    # Prepare: the stores pinned one key, coordinator/signing.key holds another
    _pin_site_store(out_dir, generate_signing_key())
    (out_dir / "coordinator").mkdir(parents=True)
    save_signing_key(generate_signing_key(), out_dir / "coordinator" / "signing.key")
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"site-01 pinned.*hydra\.run\.dir"):
        run_simulation(tiny_config("privacy=none", "secagg=off"), output_dir=out_dir)
    assert not (out_dir / "results.json").exists()


def _final_weights(out: Path) -> dict[str, np.ndarray]:
    manifest = verify_artifact(
        out / "model", public_key=load_public_key(out / "coordinator" / "signing.pub")
    )
    return read_weights(out / "model", manifest)


@pytest.mark.parametrize(
    "extra",
    [[], ["faults.drop_sites=1"], ["faults.drop_sites=1", "faults.drop_stage=after_upload"]],
    ids=["all-sites", "drop-after-keys", "drop-after-upload"],
)
def test_secagg_matches_plain_aggregation(tmp_path: Path, extra: list[str]) -> None:
    """With DP off, one secure round equals the plain FedAvg round over the same survivors."""
    base = ["privacy=none", "federation.rounds=1", "secagg.clip_range=0.5", "secagg.bits=20"]
    run_simulation(tiny_config(*base, "secagg=on", *extra), output_dir=tmp_path / "on")
    on = _results(tmp_path / "on")
    info = on["rounds"][0]["secagg"]
    assert "aborted" not in info
    if extra and "after_upload" not in extra[-1]:
        assert info["dropped"] == 1 and info["survivors"] == 3
    plain_sites = 3 if info.get("dropped") else 4
    # The plain twin: same survivors -> for the dropped case compare against sites that trained.
    run_simulation(tiny_config(*base, "secagg=off"), output_dir=tmp_path / "off")
    secure, plain = _final_weights(tmp_path / "on"), _final_weights(tmp_path / "off")
    bound = quantization_bound(0.5, 20) * 2
    if plain_sites == 4:
        for key in plain:
            np.testing.assert_allclose(secure[key], plain[key], atol=bound)
    else:
        diffs = max(float(np.abs(secure[k] - plain[k]).max()) for k in plain)
        assert diffs > bound, "a dropped site's update must be missing from the aggregate"


def test_too_few_survivors_aborts_round_cleanly(out_dir: Path) -> None:
    cfg = tiny_config("privacy=none", "faults.drop_sites=2", "secagg.threshold=3")
    run_simulation(cfg, output_dir=out_dir)
    data = _results(out_dir)
    assert data["status"] == "completed"
    assert all("aborted" in r["secagg"] for r in data["rounds"])
    assert not any(r["aggregated"] for r in data["rounds"])
    assert data["model_version"] is None, "no aggregated model, nothing published"


def test_secagg_abort_can_stop_the_federation(out_dir: Path) -> None:
    cfg = tiny_config(
        "privacy=none", "faults.drop_sites=2", "secagg.threshold=3", "secagg.on_abort=stop"
    )
    run_simulation(cfg, output_dir=out_dir)
    data = _results(out_dir)
    assert data["status"] == "stopped" and "secure aggregation aborted" in data["stop_reason"]
    assert len(data["rounds"]) == 1


class RecordingGrid(InProcessGrid):
    """Keeps every reply that reaches the coordinator."""

    seen: list[Message]

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        replies = list(super().pull_messages(message_ids))
        self.seen = [*getattr(self, "seen", []), *replies]
        return replies


def test_coordinator_never_receives_an_individual_update(
    out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedinfer.simulation import run as sim_run

    grids: list[RecordingGrid] = []

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        grids.append(RecordingGrid(*args, **kwargs))
        return grids[-1]

    monkeypatch.setattr(sim_run, "InProcessGrid", recording)
    run_simulation(tiny_config("privacy=none", "federation.rounds=1"), output_dir=out_dir)
    train_replies = [
        m for m in grids[0].seen if not m.has_error() and "secagg-masked" in m.content.array_records
    ]
    assert len(train_replies) == 4
    for reply in train_replies:
        assert Keys.ARRAYS not in reply.content.array_records, "no plain weights travel"
        masked = reply.content["secagg-masked"]["masked"].numpy()
        assert masked.dtype == np.uint64
        # Masked coordinates look uniform over 2**64: their mean is near 2**63, unlike a
        # quantized update.
        assert abs(float(masked.astype(np.float64).mean()) / 2**63 - 1) < 0.2


def test_budget_refusal_ends_the_federation_cleanly(out_dir: Path) -> None:
    cfg = tiny_config(
        "secagg=off",
        "federation.rounds=8",
        "privacy.max_epsilon=4.0",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
    )
    run_simulation(cfg, output_dir=out_dir)
    data = _results(out_dir)
    assert data["status"] == "stopped"
    assert "privacy budget" in data["stop_reason"]
    refused = {site for r in data["rounds"] for site in r["refused"]}
    assert refused, "sites refused instead of overspending"
    assert data["rounds"][0]["sites"], "the first round trained within budget"
    ledgers = [json.loads(p.read_text()) for p in (out_dir / "sites").glob("*/ledger.json")]
    assert ledgers
    for ledger in ledgers:
        assert 0 < ledger["epsilon"] <= 4.0
        assert len(ledger["entries"]) >= 1


def test_dp_and_secagg_together_report_growing_epsilon(out_dir: Path) -> None:
    # The site policy lets these DP metrics leave (by default only epsilon does).
    allowed = "site_policy.allowed_metrics=[epsilon,delta,noise-multiplier,sample-rate]"
    run_simulation(
        tiny_config("federation.rounds=3", "privacy.max_epsilon=100", allowed),
        output_dir=out_dir,
    )
    data = _results(out_dir)
    per_round = [max(r["epsilon"].values()) for r in data["rounds"]]
    assert per_round[0] < per_round[1] < per_round[2], "epsilon composes across rounds"
    assert data["max_epsilon"] == per_round[-1]
    site = data["rounds"][-1]["privacy"]["site-00"]
    assert {"delta", "noise-multiplier", "sample-rate"} <= set(site)


@pytest.mark.parametrize(
    "strategy", ["fedavg", "fedprox", "fedadam", "fedavgm", "fedmedian", "trimmed_mean", "krum"]
)
def test_every_strategy_runs(tmp_path: Path, strategy: str) -> None:
    secagg = "secagg=off" if strategy in ("fedmedian", "trimmed_mean", "krum") else "secagg=on"
    cfg = tiny_config("privacy=none", secagg, f"strategy={strategy}", "federation.rounds=1")
    result = run_simulation(cfg, output_dir=tmp_path / strategy)
    assert result.results["rounds"][0]["aggregated"] is True


def test_proximal_step_pulls_towards_the_global_model() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="logreg"), input_dim=4, num_classes=2)
    anchors = [torch.zeros_like(p) for p in model.parameters()]
    before = sum(float(p.detach().abs().sum()) for p in model.parameters())
    proximal_step_fn(model, anchors, mu=1.0, lr=0.5)()
    after = sum(float(p.detach().abs().sum()) for p in model.parameters())
    assert after == pytest.approx(before * 0.5, rel=1e-5)


def test_ray_runtime_end_to_end(out_dir: Path) -> None:
    """The real Flower simulation runtime (Ray) with DP-SGD and secure aggregation."""
    cfg = tiny_config(
        "simulation.runtime=ray",
        "federation.num_sites=3",
        "privacy.max_epsilon=100",
        "federation.client_cpus=1",
    )
    result = run_simulation(cfg, output_dir=out_dir)
    data = _results(out_dir)
    assert data["status"] == "completed" and len(data["rounds"]) == 2
    assert all(r["secagg"]["survivors"] == 3 for r in data["rounds"])
    assert set(data["rounds"][-1]["epsilon"]) == {"site-00", "site-01", "site-02"}
    assert result.coordinator.deployed == {"site-00": 1, "site-01": 1, "site-02": 1}


def test_central_dp_mode_runs(out_dir: Path) -> None:
    """privacy=central: Flower's server-side clipping + noise wrapper around FedAvg."""
    result = run_simulation(tiny_config("privacy=central", "secagg=off"), output_dir=out_dir)
    data = _results(out_dir)
    assert data["status"] == "completed" and all(r["aggregated"] for r in data["rounds"])
    assert data["config"]["privacy"]["mode"] == "central"
    assert result.final_accuracy is not None


def test_fewer_sites_than_the_secagg_floor_are_refused_before_anything_runs(
    out_dir: Path,
) -> None:
    """Two sites under a site floor of 3: every round would be refused, so refuse the run."""
    cfg = tiny_config("federation.num_sites=2", "secagg=on")
    with pytest.raises(ConfigError, match=r"`federation.num_sites`=2 .*secagg_min_participants`=3"):
        run_simulation(cfg, output_dir=out_dir)
    assert not out_dir.exists()


def test_sampling_fewer_sites_than_the_secagg_floor_is_refused(out_dir: Path) -> None:
    cfg = tiny_config("federation.num_sites=10", "federation.fraction_train=0.2", "secagg=on")
    with pytest.raises(ConfigError, match=r"`federation.fraction_train`=0.2 samples 2 of 10"):
        run_simulation(cfg, output_dir=out_dir)
    assert not out_dir.exists()
