"""From the privacy config to a checked round: config validation, noise derivation, planning."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fedinfer.config.schema import PrivacyConfig
from fedinfer.config.validate import validate_privacy
from fedinfer.errors import ConfigError, PrivacyBudgetExceeded
from fedinfer.privacy import PrivacyLedger, epsilon_from_history, plan_round

DPSGD = PrivacyConfig(mode="dpsgd", noise_multiplier=1.0)


@pytest.mark.parametrize(
    ("privacy", "key"),
    [
        (replace(DPSGD, mode="local"), "privacy.mode"),
        (replace(DPSGD, accountant="gdp"), "privacy.accountant"),
        (replace(DPSGD, grad_sample_mode="ghost"), "privacy.grad_sample_mode"),
        (replace(DPSGD, max_grad_norm=0.0), "privacy.max_grad_norm"),
        (replace(DPSGD, max_epsilon=-1.0), "privacy.max_epsilon"),
        (replace(DPSGD, delta=1.5), "privacy.delta"),
        (replace(DPSGD, noise_multiplier=-1.0), "privacy.noise_multiplier"),
        (replace(DPSGD, noise_multiplier=float("nan")), "privacy.noise_multiplier"),
        (replace(DPSGD, noise_multiplier=None), "privacy.target_epsilon"),
        (replace(DPSGD, noise_multiplier=None, target_epsilon=0.0), "privacy.target_epsilon"),
        (
            PrivacyConfig(mode="central", central_noise_multiplier=-0.1),
            "privacy.central_noise_multiplier",
        ),
    ],
    ids=[
        "mode",
        "accountant",
        "grad-sample-mode",
        "max-grad-norm",
        "max-epsilon",
        "delta",
        "negative-noise",
        "nan-noise",
        "neither-noise-nor-target",
        "zero-target",
        "central-noise",
    ],
)
def test_a_bad_privacy_config_names_its_key(privacy: PrivacyConfig, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        validate_privacy(privacy)


@pytest.mark.parametrize(
    "privacy",
    [
        DPSGD,
        PrivacyConfig(),
        PrivacyConfig(mode="central"),
        replace(DPSGD, noise_multiplier=None, target_epsilon=5.0, accountant="prv", delta=1e-6),
        replace(DPSGD, target_epsilon=3.0),
    ],
    ids=["dpsgd", "none", "central", "dpsgd-target", "noise-and-target"],
)
def test_good_privacy_configs_pass(privacy: PrivacyConfig) -> None:
    validate_privacy(privacy)


def open_ledger(state_dir: Path, privacy: PrivacyConfig, num_samples: int = 2000) -> PrivacyLedger:
    return PrivacyLedger.open(
        state_dir, accountant=privacy.accountant, delta=privacy.delta, num_samples=num_samples
    )


def test_a_target_epsilon_wins_over_a_noise_multiplier(tmp_path: Path) -> None:
    """Both set (a noise default plus a target on the command line): the target decides."""
    with_noise = replace(DPSGD, noise_multiplier=1.2, max_epsilon=50.0)
    with_target = replace(with_noise, target_epsilon=4.0)
    kwargs = {"steps_per_epoch": 63, "local_epochs": 2, "planned_rounds": 20}
    noise_plan = plan_round(privacy=with_noise, ledger=open_ledger(tmp_path, with_noise), **kwargs)
    target_plan = plan_round(
        privacy=with_target, ledger=open_ledger(tmp_path, with_target), **kwargs
    )
    assert noise_plan.noise_multiplier == 1.2
    assert target_plan.noise_multiplier != 1.2
    whole_run = epsilon_from_history(
        [(target_plan.noise_multiplier, 1 / 63, 20 * 126)],
        delta=target_plan.delta,
        accountant="rdp",
    )
    assert 4.0 - 0.05 <= whole_run <= 4.0


def test_a_plan_from_target_epsilon_spends_the_target_over_the_planned_rounds(
    tmp_path: Path,
) -> None:
    """The derived noise makes rounds x epochs x steps/epoch cost about target_epsilon."""
    # Prepare
    privacy = replace(DPSGD, noise_multiplier=None, target_epsilon=4.0, max_epsilon=4.0)
    # Execute
    plan = plan_round(
        privacy=privacy,
        ledger=open_ledger(tmp_path, privacy),
        steps_per_epoch=63,
        local_epochs=2,
        planned_rounds=20,
    )
    # Assert
    assert plan.sample_rate == 1 / 63 and plan.steps == 126
    assert plan.delta == pytest.approx(1 / 20000) and plan.spent == 0.0
    whole_run = epsilon_from_history(
        [(plan.noise_multiplier, 1 / 63, 20 * 126)], delta=plan.delta, accountant="rdp"
    )
    assert 4.0 - 0.05 <= whole_run <= 4.0
    assert 0 < plan.projected < whole_run


def test_planning_a_round_past_the_budget_raises(tmp_path: Path) -> None:
    privacy = replace(DPSGD, noise_multiplier=0.5, max_epsilon=1.0)
    with pytest.raises(PrivacyBudgetExceeded):
        plan_round(
            privacy=privacy,
            ledger=open_ledger(tmp_path, privacy),
            steps_per_epoch=63,
            local_epochs=2,
            planned_rounds=20,
        )
    assert not (tmp_path / "ledger.json").exists()


def test_planning_needs_dpsgd(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="privacy.mode"):
        plan_round(
            privacy=PrivacyConfig(),
            ledger=open_ledger(tmp_path, DPSGD),
            steps_per_epoch=63,
            local_epochs=2,
            planned_rounds=20,
        )
