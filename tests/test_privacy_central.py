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


# --------------------------------------------------------------------------- issue 11.1 / 11.5


def test_central_noise_is_not_replayable_from_the_config_seed() -> None:
    """The coordinator seeds numpy's global RNG with cfg.seed; on the old code the central
    noise came from it, so two runs with one config drew the same noise."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedinfer.fl.strategy import build_strategy
    from tests.conftest import tiny_config

    cfg = tiny_config("privacy=central", "secagg=off")
    zeros = ArrayRecord({"w": Array(np.zeros((4, 4), dtype=np.float32))})
    draws = []
    for _ in range(2):
        strategy = build_strategy(cfg, num_sites=4)
        np.random.seed(cfg.seed % 2**32)  # what run_coordinator does
        draws.append(strategy._add_noise_to_aggregated_arrays(zeros).to_numpy_ndarrays()[0])
    assert np.abs(draws[0]).sum() > 0
    assert not np.array_equal(draws[0], draws[1])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("strategy=fedmedian",), "strategy.name"),
        (("privacy.central_adaptive=true",), "privacy.central_adaptive"),
    ],
)
def test_central_dp_refuses_what_its_noise_does_not_cover(
    overrides: tuple[str, ...], key: str
) -> None:
    from fedinfer.config.validate import validate_config
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(tiny_config("privacy=central", "secagg=off", *overrides))


def test_central_dp_reports_site_level_epsilon(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from fedinfer.simulation import run_simulation
    from tests.conftest import tiny_config

    out = tmp_path / "run"
    run_simulation(
        tiny_config("privacy=central", "secagg=off", "federation.rounds=1"), output_dir=out
    )
    results = json.loads((out / "results.json").read_text())
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    central = results["central_dp"]
    assert central["unit"] == "site" and central["releases"] == 1
    assert 0 < central["epsilon"] < float("inf")
    assert manifest["privacy"]["central_dp"]["epsilon"] == central["epsilon"]
    assert results["dp"] is True


def test_central_dp_takes_a_uniform_mean_not_a_sample_weighted_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The noise is calibrated for a uniform mean (one site moves it by C/m); the old code
    let FedAvg weigh the updates by num-examples, so a large site moved it by up to C."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from fedinfer.privacy.central import SecureCentralDp, central_rng

    for attribute in ("_task_id", "_run_id", "_node_id"):  # Messages need a task identity
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    strategy = SecureCentralDp(
        FedAvg(weighted_by_key="num-examples"),
        noise_multiplier=0.0,
        clipping_norm=100.0,
        num_sampled_clients=2,
        rng=central_rng(),
    )
    strategy.current_arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    replies = []
    for value, count in ((1.0, 1.0), (3.0, 99.0)):
        request = Message(RecordDict(), dst_node_id=1, message_type="train")
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))}),
                "metrics": MetricRecord({"num-examples": count}),
            }
        )
        replies.append(Message(content, reply_to=request))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 2.0)
