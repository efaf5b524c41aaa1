"""Federated evaluation rides on the next round's train exchange (issue 15, part 1).

Round ``r``'s global model is what round ``r + 1``'s train message carries; a site asked to
evaluates it before training and returns the metrics beside its update. One exchange per
round instead of two, with the numbers of the separate evaluate exchange.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.serverapp.strategy import Strategy
from rich.console import Console

from fedinfer.config import FedInferConfig
from fedinfer.data import build_federated_data
from fedinfer.fl.client_app import build_client_app
from fedinfer.fl.coordinator import ModelShape, initial_arrays, wrap_secure_aggregation
from fedinfer.fl.grid import InProcessGrid
from fedinfer.fl.loop import FederationState, RoundRecord, run_rounds
from fedinfer.fl.messages import ErrorCodes, Keys
from fedinfer.fl.site import simulation_resolver
from fedinfer.fl.strategy import build_strategy
from fedinfer.reporting.progress import RoundPrinter
from fedinfer.simulation import run_simulation
from tests.conftest import tiny_config


class ExchangeLog(InProcessGrid):
    """The real in-process grid, logging each exchange: message types, and ride-along requests."""

    exchanges: list[Counter[str]]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        kinds = Counter(m.metadata.message_type for m in messages)
        kinds["train+evaluate"] = sum(
            m.metadata.message_type == MessageType.TRAIN
            and Keys.EVALUATE in m.content.config_records
            for m in messages
        )
        self.exchanges = [*getattr(self, "exchanges", []), +kinds]
        return super().send_and_receive(messages, timeout=timeout)


class FailingTrainGrid(ExchangeLog):
    """The first node's train replies that carry a ride-along are errors (e.g. out of budget)."""

    def _deliver(self, msg: Message) -> Message:
        reply = super()._deliver(msg)
        riding = msg.has_content() and Keys.EVALUATE in msg.content.config_records
        if msg.metadata.dst_node_id == min(self.get_node_ids()) and riding:
            reply = Message(Error(code=ErrorCodes.SITE_ERROR, reason="disk full"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        return reply


def _grid_class(monkeypatch: pytest.MonkeyPatch, cls: type[ExchangeLog]) -> list[ExchangeLog]:
    from fedinfer.simulation import run as sim_run

    grids: list[ExchangeLog] = []

    def make(*args: object, **kwargs: object) -> ExchangeLog:
        grids.append(cls(*args, **kwargs))  # type: ignore[arg-type]
        return grids[-1]

    monkeypatch.setattr(sim_run, "InProcessGrid", make)
    return grids


def _run_rounds(
    cfg: FedInferConfig, out: Path, *, grid_cls: type[ExchangeLog] = ExchangeLog
) -> tuple[ExchangeLog, Strategy, FederationState, list[ArrayRecord]]:
    """The coordinator's loop over the real ClientApp; returns the global model of every round."""
    data = build_federated_data(cfg)
    app = build_client_app(
        config_fn=lambda context: cfg,
        resolver_fn=lambda c: simulation_resolver(c, output_dir=out, coordinator_public_key=None),
    )
    grid = grid_cls(app, num_nodes=cfg.federation.num_sites, run_id=1, seed=cfg.seed)
    strategy = wrap_secure_aggregation(
        build_strategy(cfg, num_sites=cfg.federation.num_sites), cfg, grid
    )
    models: list[ArrayRecord] = []
    shape = ModelShape(data.input_dim, data.num_classes)
    state = run_rounds(
        grid=grid,
        strategy=strategy,
        state=FederationState(arrays=initial_arrays(cfg, shape)),
        num_rounds=cfg.federation.rounds,
        min_sites=cfg.federation.min_sites,
        timeout=60.0,
        train_config=ConfigRecord({Keys.RUN_ID: "e7a1"}),
        on_round_end=lambda record, state: models.append(state.arrays),
    )
    return grid, strategy, state, models


def _separate_exchange(
    grid: ExchangeLog, strategy: Strategy, server_round: int, arrays: ArrayRecord
) -> dict[str, float]:
    """What the old loop did right after aggregation: an evaluate exchange of its own."""
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
    replies = [m for m in grid.send_and_receive(messages) if not m.has_error()]
    metrics = strategy.aggregate_evaluate(server_round, replies) or {}
    return {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]


# --------------------------------------------------------------------------- exchanges


def test_a_non_dp_round_is_one_exchange(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds 1 and 2 cost one exchange each; round 3 (the last) keeps its evaluate exchange.

    The loop before this change sent a train and an evaluate exchange every round.
    """
    # Prepare
    grids = _grid_class(monkeypatch, ExchangeLog)
    cfg = tiny_config("privacy=none", "secagg=off", "federation.rounds=3")
    # Execute
    result = run_simulation(cfg, output_dir=out_dir)
    # Assert
    assert grids[0].exchanges == [
        Counter(train=4),
        Counter({"train": 4, "train+evaluate": 4}),
        Counter({"train": 4, "train+evaluate": 4}),
        Counter(evaluate=4),
        Counter({"query.deploy": 4}),
    ]
    rounds = json.loads((out_dir / "results.json").read_text())["rounds"]
    assert rounds == result.results["rounds"]
    assert [r["federated_via"] for r in rounds] == ["train", "train", "evaluate"]
    for r in rounds:  # the pooled test split is the union of the sites': the same model's numbers
        assert r["federated"]["eval-accuracy"] == pytest.approx(r["accuracy"], abs=1e-9)
        assert r["federated"]["eval-loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert "evaluate" not in r["timings"] or r["round"] == 3
        for metrics in r["sites"].values():
            assert not any(k.startswith("eval-") for k in metrics), "train metrics stay apart"


@pytest.mark.parametrize(
    "overrides",
    [
        ("secagg=off",),
        ("secagg=off", "federation.fraction_train=0.5"),
        ("secagg=on",),
        ("secagg=on", "strategy=fedadam"),
    ],
    ids=["plain", "half-train", "secagg", "secagg-fedadam"],
)
def test_ride_along_numbers_equal_the_separate_evaluate_exchange(
    tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    """Round r's model evaluated before round r + 1 trains gives exactly the metrics of an
    evaluate exchange right after round r's aggregation (the old loop), for every round."""
    # Prepare
    cfg = tiny_config("privacy=none", "model=logreg", "federation.rounds=3", *overrides)
    # Execute
    grid, strategy, state, models = _run_rounds(cfg, tmp_path)
    # Assert
    assert all(r.aggregated for r in state.history)
    assert [r.federated_via for r in state.history] == ["train", "train", "evaluate"]
    train_exchanges = [e for e in grid.exchanges if e["train"]]
    assert len(train_exchanges) == 3, "no second exchange in a round that trains"
    if "federation.fraction_train=0.5" in overrides:  # 2 train, all 4 evaluate: 2 ride, 2 alone
        assert train_exchanges[1] == Counter(train=2, evaluate=2, **{"train+evaluate": 2})
    for record, arrays in zip(state.history, models, strict=True):
        separate = _separate_exchange(grid, strategy, record.round, arrays)
        # Same sites, same numbers; the weighted mean sums them in sampling order (last bit).
        assert record.federated == pytest.approx(separate, rel=1e-12, abs=0)


def test_evaluating_first_does_not_change_the_training(tmp_path: Path) -> None:
    """The same run without federated evaluation ends on the same model (secagg masks unchanged)."""
    # Prepare
    riding = tiny_config("privacy=none", "secagg=on", "model=logreg", "federation.rounds=3")
    without = tiny_config(
        "privacy=none", "secagg=on", "model=logreg", "federation.rounds=3",
        "federation.fraction_evaluate=0",
    )  # fmt: skip
    # Execute
    a = _run_rounds(riding, tmp_path / "a")
    b = _run_rounds(without, tmp_path / "b")
    # Assert
    assert sum(e["train+evaluate"] for e in a[0].exchanges) == 8
    assert sum(e["train+evaluate"] + e["evaluate"] for e in b[0].exchanges) == 0
    assert all(not r.federated for r in b[2].history)
    for name, array in a[2].arrays.items():
        expected = b[2].arrays[name].numpy()
        np.testing.assert_allclose(array.numpy(), expected, rtol=1e-6, err_msg=name)


def test_an_evaluation_whose_train_reply_failed_is_asked_again(tmp_path: Path) -> None:
    """A site that fails (or refuses) to train loses no evaluation: it gets the evaluate
    message the separate exchange would have sent it, in a second exchange that round."""
    # Prepare
    cfg = tiny_config("privacy=none", "secagg=off", "model=logreg", "federation.rounds=2")
    # Execute
    grid, strategy, state, models = _run_rounds(cfg, tmp_path, grid_cls=FailingTrainGrid)
    # Assert
    assert grid.exchanges[1] == Counter({"train": 4, "train+evaluate": 4})
    assert grid.exchanges[2] == Counter(evaluate=1), "the failed site's evaluation, asked again"
    assert state.history[1].failed, "round 2 recorded the failure"
    first = state.history[0]
    separate = _separate_exchange(grid, strategy, 1, models[0])
    assert first.federated == pytest.approx(separate, rel=1e-12, abs=0)


def test_a_round_left_pending_gets_an_evaluate_exchange_at_the_end(tmp_path: Path) -> None:
    """A run resumed with no round left to carry the last round's evaluation still gets it."""
    # Prepare
    cfg = tiny_config("privacy=none", "secagg=off", "model=logreg", "federation.rounds=1")
    grid, strategy, state, models = _run_rounds(cfg, tmp_path)
    state.history[-1].federated, state.history[-1].federated_via = {}, "pending"
    late: list[RoundRecord] = []
    # Execute
    run_rounds(
        grid=grid, strategy=strategy, state=state, num_rounds=1, min_sites=2, timeout=60.0,
        train_config=ConfigRecord(), on_federated=lambda record, state: late.append(record),
    )  # fmt: skip
    # Assert
    assert late == [state.history[-1]] and late[0].federated_via == "evaluate"
    separate = _separate_exchange(grid, strategy, 1, models[0])
    assert late[0].federated == pytest.approx(separate, rel=1e-12, abs=0)


def test_a_resumed_run_gets_the_evaluation_its_crash_left_pending(tmp_path: Path) -> None:
    """The coordinator dies while round 2 trains (round 1's evaluation riding along); the
    checkpoint holds round 1 as pending, and the resumed run fills in the same numbers."""
    from tests.test_checkpoint import CoordinatorCrash, _coordinate
    from tests.test_checkpoint import tiny_config as logreg_config

    # Prepare
    cfg = logreg_config("privacy=none", "secagg=off", "federation.rounds=3")
    straight = _coordinate(cfg, tmp_path / "straight")
    with pytest.raises(CoordinatorCrash):
        _coordinate(cfg, tmp_path / "crashed", crash_round=2)
    saved = json.loads((tmp_path / "crashed" / "results.json").read_text())["rounds"]
    assert [r["federated_via"] for r in saved] == ["pending"]
    # Execute
    resumed = _coordinate(cfg, tmp_path / "crashed", resume=True)
    # Assert
    rounds = resumed.results["rounds"]
    assert [r["federated_via"] for r in rounds] == ["train", "train", "evaluate"]
    assert [r["federated"] for r in rounds] == [r["federated"] for r in straight.results["rounds"]]


# --------------------------------------------------------------------------- the site decides


def _site_call(cfg: FedInferConfig, tmp_path: Path, message_type: str, *, ride: bool) -> Message:
    """One message with the initial model to one real site (its policy: ``cfg.site_policy``)."""
    data = build_federated_data(cfg)
    app = build_client_app(
        config_fn=lambda context: cfg,
        resolver_fn=lambda c: simulation_resolver(
            c, output_dir=tmp_path, coordinator_public_key=None
        ),
    )
    arrays = initial_arrays(cfg, ModelShape(data.input_dim, data.num_classes))
    config = ConfigRecord({Keys.SERVER_ROUND: 2, Keys.RUN_ID: "e7a1"})
    content = RecordDict({Keys.ARRAYS: arrays, Keys.CONFIG: config})
    if ride:
        content[Keys.EVALUATE] = ConfigRecord({Keys.SERVER_ROUND: 1})
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(), run_config={},
    )  # fmt: skip
    return app(Message(content, 7, message_type), context)


def test_the_ride_along_gives_the_evaluate_handlers_numbers_and_the_same_update(
    tmp_path: Path,
) -> None:
    # Prepare
    cfg = tiny_config("privacy=none", "secagg=off", "model=logreg")
    # Execute
    riding = _site_call(cfg, tmp_path / "a", MessageType.TRAIN, ride=True)
    plain = _site_call(cfg, tmp_path / "b", MessageType.TRAIN, ride=False)
    evaluated = _site_call(cfg, tmp_path / "c", MessageType.EVALUATE, ride=False)
    # Assert
    assert dict(riding.content[Keys.EVALUATION]) == dict(evaluated.content[Keys.METRICS])
    assert set(riding.content.metric_records) == {Keys.METRICS, Keys.EVALUATION}
    assert not any(k.startswith("eval-") for k in riding.content[Keys.METRICS])
    for name, array in plain.content[Keys.ARRAYS].items():
        np.testing.assert_array_equal(riding.content[Keys.ARRAYS][name].numpy(), array.numpy())
    assert Keys.EVALUATION not in plain.content.metric_records


def test_a_dp_site_refuses_an_evaluation_smuggled_into_a_train_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a coordinator asks a DP site (``allow_evaluation = false``) for exact metrics
    inside a train message instead of an evaluate message. The site checks the same policy,
    trains, and sends no metric of the evaluation; a site that skipped the check would leak."""
    # Prepare
    cfg = tiny_config("site_policy=strict", "secagg=off", "site_policy.require_secagg=false")
    # Execute
    reply = _site_call(cfg, tmp_path / "site", MessageType.TRAIN, ride=True)
    # Assert
    assert not reply.has_error(), "the site still trains"
    assert Keys.EVALUATION not in reply.content.metric_records
    refusal = reply.content[Keys.EVALUATION_REFUSED]
    assert refusal["code"] == ErrorCodes.POLICY_REFUSED
    assert str(refusal["reason"]).startswith("policy allow_evaluation:")
    assert set(reply.content[Keys.METRICS]) == {"epsilon", "num-examples"}
    # The negative twin: the same request to a site without the policy check leaks the metrics.
    from fedinfer.fl import client_app

    monkeypatch.setattr(client_app, "check_evaluate", lambda policy, request: None)
    naive = _site_call(cfg, tmp_path / "naive", MessageType.TRAIN, ride=True)
    assert "eval-accuracy" in naive.content[Keys.EVALUATION]


def test_dp_sites_that_allow_evaluation_answer_on_the_train_reply(
    out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DP-SGD + secure aggregation, sites whose policy allows evaluation: one exchange a round
    (plus secagg's own), every round's federated metrics are the held-out ones."""
    # Prepare
    grids = _grid_class(monkeypatch, ExchangeLog)
    cfg = tiny_config(
        "federation.rounds=3", "privacy.max_epsilon=100", "site_policy.allow_evaluation=true"
    )
    # Execute
    run_simulation(cfg, output_dir=out_dir)
    # Assert
    rounds = json.loads((out_dir / "results.json").read_text())["rounds"]
    assert [r["federated_via"] for r in rounds] == ["train", "train", "evaluate"]
    for r in rounds:
        assert r["aggregated"] and r["federated"]["eval-accuracy"] == pytest.approx(r["accuracy"])
    assert sum(e["evaluate"] for e in grids[0].exchanges) == 4, "only the last round's exchange"
    assert sum(e["train+evaluate"] for e in grids[0].exchanges) == 8


# --------------------------------------------------------------------------- reporting


def test_the_round_table_marks_metrics_that_arrived_a_round_late() -> None:
    """A deployment (no held-out split): round r's row shows round r-1's federated metrics,
    marked ``^`` and explained once; the last row shows its own, marked ``*``."""
    # Prepare
    out = io.StringIO()
    printer = RoundPrinter(num_rounds=3, console=Console(file=out, width=150))
    one = RoundRecord(round=1, federated={"eval-accuracy": 0.5}, federated_via="train")
    two = RoundRecord(round=2, federated={"eval-accuracy": 0.625}, federated_via="train")
    three = RoundRecord(round=3, federated={"eval-accuracy": 0.75}, federated_via="evaluate")
    # Execute
    printer.line(RoundRecord(round=1, federated_via="pending"))
    printer.line(RoundRecord(round=2, federated_via="pending"), previous=one)
    printer.line(three, previous=two)
    # Assert
    header, first, legend, second, third = out.getvalue().splitlines()
    assert first.split()[1] == "-" and second.split()[1] == "0.5000^"
    assert "^ of the previous round's model" in legend and third.split()[1] == "0.7500*"


def test_late_metrics_rewrite_the_round_in_results_json(tmp_path: Path) -> None:
    from fedinfer.reporting.results import ResultsWriter
    from fedinfer.reporting.tracking import round_metrics

    writer = ResultsWriter(tmp_path, cfg=tiny_config(), run_id="r")
    writer.add_round(RoundRecord(round=1, federated_via="pending").to_json(), elapsed_s=1.0)
    writer.add_round(RoundRecord(round=2, federated_via="pending").to_json(), elapsed_s=2.0)
    writer.update_round(
        RoundRecord(round=1, federated={"eval-loss": 0.5}, federated_via="train").to_json()
    )
    rounds = json.loads((tmp_path / "results.json").read_text())["rounds"]
    assert [r["federated_via"] for r in rounds] == ["train", "pending"]
    assert rounds[0]["federated"] == {"eval-loss": 0.5} and len(rounds) == 2
    # MLflow gets just the late metrics, at the round's step (the coordinator's on_federated)
    assert round_metrics({"federated": rounds[0]["federated"]}) == {"federated/eval-loss": 0.5}


@pytest.mark.slow  # ~20-50 s: Ray start-up
def test_the_evaluation_rides_along_on_flowers_ray_runtime(out_dir: Path) -> None:
    """Flower's simulation runtime (Ray), DP-SGD + secure aggregation, sites that allow
    evaluation: every round's federated metrics come, and are the held-out ones."""
    # Prepare
    cfg = tiny_config(
        "simulation.runtime=ray", "federation.num_sites=3", "federation.client_cpus=1",
        "federation.rounds=3", "privacy.max_epsilon=100", "site_policy.allow_evaluation=true",
    )  # fmt: skip
    # Execute
    result = run_simulation(cfg, output_dir=out_dir)
    # Assert
    rounds = result.results["rounds"]
    assert [r["federated_via"] for r in rounds] == ["train", "train", "evaluate"]
    for r in rounds:
        assert r["secagg"]["survivors"] == 3
        assert r["federated"]["eval-accuracy"] == pytest.approx(r["accuracy"], abs=1e-9)
