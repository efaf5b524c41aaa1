"""Issue 11 item 1: DP noise and Poisson sampling cannot be replayed from the config.

The attack tests here failed on the old code (noise and sampling seeded from
``round_seed(cfg.seed, site, round)``): two DP rounds from the same inputs were
bit-identical, so a coordinator that knows the config could replay a site's noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedinfer.config import FedInferConfig
from fedinfer.data import build_federated_data
from fedinfer.data.datasets import ArrayDataset
from fedinfer.errors import ConfigError
from fedinfer.fl.site import SiteEnv, local_train
from tests.conftest import tiny_config


def _dp_config(*overrides: str) -> FedInferConfig:
    return tiny_config(
        "privacy=dpsgd",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
        "privacy.max_epsilon=1000",
        "federation.rounds=2",
        "federation.batch_size=32",
        "model=logreg",
        *overrides,
    )


def _env(
    cfg: FedInferConfig, state_dir: Path, *, simulated: bool = False, drop: int = 0
) -> SiteEnv:
    data = build_federated_data(cfg).sites[0]
    if drop:
        train = data.train
        keep = np.arange(len(train)) >= drop
        data = dataclasses.replace(
            data,
            train=ArrayDataset(train.x[keep], train.y[keep], num_classes=train.num_classes),
        )
    return SiteEnv(data.site_id, state_dir, data, None, simulated=simulated)


def _train(cfg: FedInferConfig, env: SiteEnv) -> dict[str, np.ndarray]:
    import torch

    from fedinfer.models import build_model
    from fedinfer.training import get_weights

    torch.manual_seed(0)  # the same global model every time
    model = build_model(cfg.model, input_dim=env.data.input_dim, num_classes=env.data.num_classes)
    outcome = local_train(
        cfg=cfg, env=env, global_weights=get_weights(model), server_round=1, run_id="r"
    )
    return outcome.weights


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_two_dp_rounds_with_the_same_seed_and_config_differ(tmp_path: Path) -> None:
    cfg = _dp_config()
    first = _train(cfg, _env(cfg, tmp_path / "a"))
    second = _train(cfg, _env(cfg, tmp_path / "b"))
    assert not _same(first, second)
    # Different, but by DP noise only: both are still trained models of the same shape.
    assert all(first[k].shape == second[k].shape for k in first)


def test_a_coordinator_that_knows_the_config_cannot_replay_the_noise(tmp_path: Path) -> None:
    """The distinguishing attack: the site trains on D minus one record; the coordinator knows
    the config and both candidate datasets, replays the round on each and compares. On the old
    code the replay on the true dataset matched bit for bit (a perfect membership test)."""
    cfg = _dp_config()
    observed = _train(cfg, _env(cfg, tmp_path / "site", drop=1))
    replay_without = _train(cfg, _env(cfg, tmp_path / "attacker-a", drop=1))
    replay_with = _train(cfg, _env(cfg, tmp_path / "attacker-b"))
    assert not _same(observed, replay_without)
    assert not _same(observed, replay_with)


def test_reproducible_noise_is_repeatable_in_a_simulation(tmp_path: Path) -> None:
    cfg = _dp_config("privacy.reproducible_noise=true")
    first = _train(cfg, _env(cfg, tmp_path / "a", simulated=True))
    second = _train(cfg, _env(cfg, tmp_path / "b", simulated=True))
    assert _same(first, second)


def test_a_deployed_site_refuses_reproducible_noise(tmp_path: Path) -> None:
    cfg = _dp_config("privacy.reproducible_noise=true")
    with pytest.raises(ConfigError, match=r"privacy\.reproducible_noise"):
        _train(cfg, _env(cfg, tmp_path / "a"))
    assert not (tmp_path / "a" / "ledger.json").exists()  # refused before the data is touched


def test_fedinfer_coordinator_refuses_reproducible_noise(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedinfer.cli",
            "coordinator",
            "--pki",
            str(tmp_path / "pki"),
            "--workdir",
            str(tmp_path / "work"),
            "privacy=dpsgd",
            "privacy.reproducible_noise=true",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "privacy.reproducible_noise" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("flag", "dp"), [("false", True), ("true", False)])
def test_results_and_manifest_say_whether_the_run_is_dp(
    out_dir: Path, flag: str, dp: bool
) -> None:
    import json

    from fedinfer.simulation import run_simulation

    # secagg=off: fedinfer/fl/secagg_site.py (the secagg part) still records Flower's run id.
    cfg = _dp_config("federation.rounds=1", "secagg=off", f"privacy.reproducible_noise={flag}")
    run_simulation(cfg, output_dir=out_dir)
    results = json.loads((out_dir / "results.json").read_text())
    manifest = json.loads((out_dir / "model" / "manifest.json").read_text())
    assert results["dp"] is dp
    assert manifest["privacy"]["dp"] is dp
    # Issue 14 item 6: one run id: every site's ledger records the id results.json records.
    ledgers = sorted((out_dir / "sites").glob("*/ledger.json"))
    assert ledgers
    for path in ledgers:
        entries = json.loads(path.read_text())["entries"]
        assert {e["run_id"] for e in entries} == {results["run_id"]}


# --------------------------------------------------------------------------- issue 11.5: budget


def _train_once(cfg: Any, env: Any, model: Any, *, after_step: Callable[[], None]) -> None:
    """One round of DP-SGD at ``env``'s site (round 1 of run ``r``), ``after_step`` after each."""
    import torch

    from fedinfer.fl.site_privacy import private_train
    from fedinfer.training import make_loader

    private_train(
        cfg=cfg,
        env=env,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loader=make_loader(env.data.train, batch_size=32, shuffle=True, seed=1),
        device=torch.device("cpu"),
        after_step=after_step,
        server_round=1,
        run_id="r",
    )


def test_two_concurrent_trainings_cannot_both_pass_a_budget_only_one_fits(tmp_path: Path) -> None:
    """Two trainings of one site start together (the barrier holds both inside their first
    DP step). On the old code both passed the budget check before either charged, and the
    ledger ended over budget; now the second one's reservation is refused."""
    import threading

    from fedinfer.errors import PrivacyBudgetExceeded
    from fedinfer.models import build_model
    from fedinfer.privacy import PrivacyLedger

    cfg = _dp_config()
    env = _env(cfg, tmp_path / "site")
    steps = -(-len(env.data.train) // cfg.federation.batch_size)
    probe = PrivacyLedger(path=tmp_path / "probe.json", accountant="rdp", delta=1e-5)
    one = probe.projected_epsilon(noise_multiplier=1.0, sample_rate=1 / steps, steps=steps)
    two = probe.projected_epsilon(noise_multiplier=1.0, sample_rate=1 / steps, steps=2 * steps)
    cfg.privacy.max_epsilon = (one + two) / 2
    cfg.privacy.delta = 1e-5
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def meet() -> None:
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass  # the other training was refused

    def train() -> None:
        model = build_model(cfg.model, input_dim=env.data.input_dim, num_classes=10)
        first = [True]

        def after_step() -> None:
            if first[0]:
                first[0] = False
                meet()

        try:
            _train_once(cfg, env, model, after_step=after_step)
            outcomes.append("trained")
        except PrivacyBudgetExceeded:
            outcomes.append("refused")
            barrier.abort()

    threads = [threading.Thread(target=train) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "trained"]
    ledger = PrivacyLedger.read(env.state_dir)
    assert ledger.epsilon <= cfg.privacy.max_epsilon
    assert len(ledger.entries) == 1 and not ledger.reservations


def test_a_failed_training_releases_its_reservation(tmp_path: Path) -> None:
    from fedinfer.privacy import PrivacyLedger

    cfg = _dp_config()
    env = _env(cfg, tmp_path / "site")

    class Boom(RuntimeError):
        pass

    def explode() -> None:
        raise Boom

    from fedinfer.models import build_model

    model = build_model(cfg.model, input_dim=env.data.input_dim, num_classes=10)
    with pytest.raises(Boom):
        _train_once(cfg, env, model, after_step=explode)
    ledger = PrivacyLedger.read(env.state_dir)
    assert not ledger.entries and not ledger.reservations


def test_poisson_sampling_false_is_refused_not_charged_as_poisson() -> None:
    from fedinfer.config.validate import validate_config

    with pytest.raises(ConfigError, match=r"privacy\.poisson_sampling"):
        validate_config(_dp_config("privacy.poisson_sampling=false"))
