"""Accountant registry and epsilon functions: golden values vs Google's dp-accounting, laws."""

from __future__ import annotations

from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedinfer.errors import ConfigError
from fedinfer.privacy import (
    RDP_ORDERS,
    HistoryEntry,
    LedgerEntry,
    PrivacyLedger,
    create_accountant,
    default_delta,
    derive_noise_multiplier,
    epsilon_from_history,
    merge_history,
    prv_epsilon,
)

# The DP-SGD MNIST setting of Abadi et al.: 60 epochs of batch 256 on 60 000 images.
GOLDEN_Q, GOLDEN_SIGMA, GOLDEN_STEPS, GOLDEN_DELTA = 256 / 60000, 1.1, 14062, 1e-5


def golden_ledger(tmp_path: Path, accountant: str) -> PrivacyLedger:
    """The golden history charged as 3 rounds: 7000, 7000 and 62 steps."""
    rounds = [7000, 7000, 62]
    entries = [
        LedgerEntry(
            round=r,
            run_id="golden",
            time="2025-01-01T00:00:00Z",
            noise_multiplier=GOLDEN_SIGMA,
            sample_rate=GOLDEN_Q,
            steps=steps,
            delta=GOLDEN_DELTA,
            epsilon_after=None,
        )
        for r, steps in enumerate(rounds, start=1)
    ]
    return PrivacyLedger(
        path=tmp_path / "ledger.json", accountant=accountant, delta=GOLDEN_DELTA, entries=entries
    )


def dp_accounting_event(history: list[HistoryEntry]) -> dp_accounting.DpEvent:
    """The ledger history as a dp-accounting composed event, entry by entry (no merging)."""
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
            for sigma, q, steps in history
        ]
    )


def test_rdp_matches_dp_accounting_on_the_golden_history(tmp_path: Path) -> None:
    """Our RDP epsilon equals dp-accounting's RDP (same orders) within 0.1 %, and is 2.5966."""
    # Prepare
    ledger = golden_ledger(tmp_path, "rdp")
    reference = rdp.RdpAccountant(orders=RDP_ORDERS)
    reference.compose(dp_accounting_event(ledger.history))
    opacus_orders = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    opacus_orders.compose(dp_accounting_event(ledger.history))
    # Execute
    epsilon = ledger.epsilon
    # Assert
    assert epsilon == pytest.approx(reference.get_epsilon(GOLDEN_DELTA), rel=1e-3)
    assert epsilon == pytest.approx(opacus_orders.get_epsilon(GOLDEN_DELTA), rel=1e-3)
    assert epsilon == pytest.approx(2.5966, abs=1e-4)


def test_our_rdp_orders_are_dp_accountings_defaults() -> None:
    assert list(RDP_ORDERS) == sorted(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


def test_prv_matches_dp_accounting_pld_on_the_golden_history(tmp_path: Path) -> None:
    """Our PRV epsilon is within 0.02 of dp-accounting's PLD (discretization 1e-4) = 2.3817."""
    # Prepare
    ledger = golden_ledger(tmp_path, "prv")
    reference = pld.PLDAccountant(value_discretization_interval=1e-4)
    reference.compose(dp_accounting_event(ledger.history))
    # Execute
    epsilon = ledger.epsilon
    expected = reference.get_epsilon(GOLDEN_DELTA)
    # Assert
    assert expected == pytest.approx(2.3817, abs=1e-3)
    assert epsilon == pytest.approx(expected, abs=0.02)
    assert epsilon >= expected - 1e-3  # PRV reports its certified upper bound


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_thirty_rounds_cost_more_than_one(accountant: str) -> None:
    """Composition: 30 rounds of one epoch spend more than 1 round (and less than 30x)."""
    # Prepare
    one_round: HistoryEntry = (1.0, 0.01, 100)
    # Execute
    eps_1 = epsilon_from_history([one_round], delta=1e-5, accountant=accountant)
    eps_30 = epsilon_from_history([one_round] * 30, delta=1e-5, accountant=accountant)
    # Assert
    assert eps_1 < eps_30 < 30 * eps_1


@settings(max_examples=15, deadline=None)
@given(
    sigma=st.floats(0.5, 5.0),
    q=st.floats(1e-3, 0.2),
    steps=st.integers(1, 2000),
    extra_sigma=st.floats(0.01, 2.0),
    extra_steps=st.integers(1, 2000),
)
def test_rdp_epsilon_grows_with_steps_and_shrinks_with_noise(
    sigma: float, q: float, steps: int, extra_sigma: float, extra_steps: int
) -> None:
    """Law: more noise -> less epsilon; more steps -> more epsilon."""
    # Execute
    base = epsilon_from_history([(sigma, q, steps)], delta=1e-5, accountant="rdp")
    noisier = epsilon_from_history([(sigma + extra_sigma, q, steps)], delta=1e-5, accountant="rdp")
    longer = epsilon_from_history([(sigma, q, steps + extra_steps)], delta=1e-5, accountant="rdp")
    # Assert
    assert noisier <= base <= longer


@pytest.mark.parametrize(
    ("more", "less"),
    [((1.0, 0.02, 500), (2.0, 0.02, 500)), ((1.0, 0.02, 1000), (1.0, 0.02, 500))],
    ids=["more-noise-less-epsilon", "more-steps-more-epsilon"],
)
def test_prv_is_monotone(more: HistoryEntry, less: HistoryEntry) -> None:
    # Execute / Assert
    assert epsilon_from_history([more], delta=1e-5, accountant="prv") > epsilon_from_history(
        [less], delta=1e-5, accountant="prv"
    )


def test_merging_identical_mechanisms_changes_nothing() -> None:
    """Merging all equal (sigma, q) entries, consecutive or not, gives the same epsilon."""
    # Prepare
    history: list[HistoryEntry] = [
        (1.0, 0.01, 50),
        (1.5, 0.01, 20),
        (1.0, 0.01, 50),
        (1.0, 0.01, 0),
    ]
    # Execute
    merged = merge_history(history)
    # Assert
    assert merged == [(1.0, 0.01, 100), (1.5, 0.01, 20)]
    for accountant in ("rdp", "prv"):
        engine = create_accountant(accountant)
        engine.history = [entry for entry in history if entry[2] > 0]  # unmerged reference
        assert epsilon_from_history(history, delta=1e-5, accountant=accountant) == pytest.approx(
            engine.get_epsilon(delta=1e-5), rel=1e-6
        )


def test_empty_history_spends_nothing() -> None:
    assert epsilon_from_history([], delta=1e-5, accountant="prv") == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_derived_noise_spends_about_the_target(accountant: str) -> None:
    """The derived sigma spends at most target_epsilon, and a bit less noise would overspend."""
    # Execute
    sigma = derive_noise_multiplier(
        target_epsilon=2.0, delta=1e-5, sample_rate=0.02, steps=30 * 50, accountant=accountant
    )
    spent = epsilon_from_history([(sigma, 0.02, 1500)], delta=1e-5, accountant=accountant)
    # Assert
    assert 2.0 - 0.05 <= spent <= 2.0
    assert (
        epsilon_from_history([(0.9 * sigma, 0.02, 1500)], delta=1e-5, accountant=accountant) > 2.0
    )


def test_an_unreachable_target_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        derive_noise_multiplier(
            target_epsilon=1e-9, delta=1e-5, sample_rate=1.0, steps=10**6, accountant="rdp"
        )


def test_unknown_accountant_names_the_key() -> None:
    with pytest.raises(ConfigError, match="privacy.accountant"):
        create_accountant("moments")


@pytest.mark.parametrize("n", [1, 37, 5000, 10**6])
def test_default_delta_is_below_one_over_n(n: int) -> None:
    assert default_delta(n) == pytest.approx(1 / (10 * n))
    assert default_delta(n) < 1 / n


def pld_epsilon(history: list[HistoryEntry], delta: float) -> float:
    reference = pld.PLDAccountant(value_discretization_interval=1e-4)
    reference.compose(dp_accounting_event(history))
    return float(reference.get_epsilon(delta))


def test_a_coarsened_prv_grid_is_still_an_upper_bound_and_close() -> None:
    """Capping the PRV grid (5x fewer points) loosens epsilon a little, never below PLD."""
    # Prepare
    history: list[HistoryEntry] = [(GOLDEN_SIGMA, GOLDEN_Q, GOLDEN_STEPS)]
    expected = pld_epsilon(history, GOLDEN_DELTA)
    # Execute
    coarse = prv_epsilon(history, delta=GOLDEN_DELTA, max_grid_points=1e5)
    # Assert
    assert expected - 1e-3 <= coarse <= expected + 0.1


def test_an_enormous_prv_history_falls_back_to_rdp_instead_of_exhausting_memory() -> None:
    """10^6 steps at epsilon ~450 would need a 3e8-point grid; the RDP bound is used."""
    # Prepare
    history: list[HistoryEntry] = [(1.0, 0.02, 10**6)]
    # Execute
    epsilon = epsilon_from_history(history, delta=1e-5, accountant="prv")
    # Assert
    assert epsilon == epsilon_from_history(history, delta=1e-5, accountant="rdp")


def test_prv_at_sample_rate_one_matches_pld() -> None:
    """Full-batch DP-SGD (a site smaller than one batch): q = 1 works, without warnings."""
    history: list[HistoryEntry] = [(1.0, 1.0, 10)]
    assert epsilon_from_history(history, delta=1e-5, accountant="prv") == pytest.approx(
        pld_epsilon(history, 1e-5), abs=0.02
    )
