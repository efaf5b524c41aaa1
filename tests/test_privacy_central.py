"""Central (user-level) DP: Flower's server-side DP wrappers around a Message-API strategy."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fedinfer.config.schema import PrivacyConfig
from fedinfer.errors import ConfigError

pytestmark = [
    # typer (imported by Flower's logger) touches a deprecated click API at import time.
    pytest.mark.filterwarnings("ignore:'click.utils.get_binary_stream' is deprecated"),
]

CENTRAL = PrivacyConfig(mode="central", central_noise_multiplier=0.8, max_grad_norm=0.5)


def test_fixed_clipping_wraps_fedavg() -> None:
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    from fedinfer.privacy import central_dp_strategy

    # Prepare
    fedavg = FedAvg()
    # Execute
    strategy = central_dp_strategy(fedavg, privacy=CENTRAL, num_sampled_clients=7)
    # Assert
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    assert strategy.strategy is fedavg
    assert (strategy.noise_multiplier, strategy.clipping_norm, strategy.num_sampled_clients) == (
        0.8,
        0.5,
        7,
    )


def test_adaptive_clipping_starts_from_max_grad_norm() -> None:
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

    from fedinfer.privacy import central_dp_strategy

    # Execute
    strategy = central_dp_strategy(
        FedAvg(), privacy=replace(CENTRAL, central_adaptive=True), num_sampled_clients=7
    )
    # Assert
    assert isinstance(strategy, DifferentialPrivacyServerSideAdaptiveClipping)
    assert strategy.clipping_norm == 0.5 and strategy.num_sampled_clients == 7


@pytest.mark.parametrize(
    ("arguments", "key"),
    [
        ({"noise_multiplier": -1.0}, "privacy.central_noise_multiplier"),
        ({"clipping_norm": 0.0}, "privacy.max_grad_norm"),
        ({"num_sampled_clients": 0}, "federation.fraction_train"),
    ],
    ids=["negative-noise", "zero-clip", "no-sites"],
)
def test_bad_values_are_config_errors(arguments: dict[str, float], key: str) -> None:
    from flwr.serverapp.strategy import FedAvg

    from fedinfer.privacy import wrap_central_dp

    settings: dict[str, float] = {
        "noise_multiplier": 1.0,
        "clipping_norm": 1.0,
        "num_sampled_clients": 5,
    }
    settings.update(arguments)
    with pytest.raises(ConfigError, match=key):
        wrap_central_dp(FedAvg(), **settings)  # type: ignore[arg-type]


def test_central_needs_central_mode() -> None:
    from flwr.serverapp.strategy import FedAvg

    from fedinfer.privacy import central_dp_strategy

    with pytest.raises(ConfigError, match="privacy.mode"):
        central_dp_strategy(FedAvg(), privacy=PrivacyConfig(mode="dpsgd"), num_sampled_clients=3)


def test_adaptive_clipping_keeps_the_total_noise_multiplier_with_few_sites() -> None:
    """Few sites: the clipped-count noise is raised so that the budget split exists."""
    from flwr.serverapp.strategy import FedAvg

    from fedinfer.privacy import wrap_central_dp

    # Execute
    strategy = wrap_central_dp(
        FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=3, adaptive=True
    )
    # Assert: composing the update noise and the count noise gives back the requested 1.0
    update, count = strategy.noise_multiplier, strategy.clipped_count_stddev
    assert (update**-2 + (2 * count) ** -2) ** -0.5 == pytest.approx(1.0)
    assert update == pytest.approx(2 / 3**0.5)
