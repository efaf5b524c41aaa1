"""The coordinator's round loop.

Flower's ``Strategy.start`` runs a fixed number of rounds from round 1. We need
more from the loop: resume from a checkpoint, sites that refuse (privacy budget,
or a request their own policy forbids: ``refused: policy <key>``) and must stop
being sampled, a clean end when too few sites can train, and a
hook after every round (results, progress, checkpoint). The strategy's own
``configure_*`` / ``aggregate_*`` methods are called exactly as ``start`` calls
them, so every Flower strategy (and our secure-aggregation wrapper) plugs in.

Evaluation rides on the train exchange
--------------------------------------
Each exchange with the sites costs a round trip (seconds of Flower polling in a
deployment), so round ``r``'s federated evaluation does not get an exchange of its own
when a round ``r + 1`` follows: round ``r + 1``'s train message already carries round
``r``'s global model, and a site asked to (a ``Keys.EVALUATE`` record) evaluates that model
on its test split *before* it trains, and returns the metrics in its train reply as a
record of their own (``Keys.EVALUATION``, never mixed into the train metrics). The site
checks the ride-along request against its policy exactly as an evaluate message
(``allow_evaluation`` in DP mode); a site that refuses still trains and says so in the
reply (``Keys.EVALUATION_REFUSED``), and is not asked again. The sites sampled for
evaluation are Flower's ``configure_evaluate`` sample, drawn before round ``r + 1``'s train
sample as the separate exchanges drew them; a sampled site that does not train this round
(not sampled for it, or out of budget) gets a plain evaluate message in the same exchange,
and a site whose train reply is an error (it refused to train, ran out of budget, failed)
gets one in a second exchange, so no evaluation is lost with a training. The replies are
aggregated by ``aggregate_evaluate`` in the order the sites were sampled, as before, so
the numbers are those of the separate exchange. With secure aggregation the masked update is unchanged: the
evaluation metrics travel beside it in the clear, exactly as in an evaluate reply.

The last round, and a round after which the run stops (too few sites left, the
strategy stopped), keep a separate evaluate exchange, so every round has its
federated metrics. A round's record is finished (``on_round_end``: results,
checkpoint, progress line) once, when the round ends; metrics that arrive a round
later are filled into it (``federated_via="train"``) and reported through
``on_federated`` (results.json and MLflow, no second checkpoint or progress line;
the next round's checkpoint holds them, and its progress line shows them, marked).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedinfer.fl.grid import ExcludingGrid
from fedinfer.fl.messages import ErrorCodes, Keys

__all__ = ["EvaluateFn", "FederationState", "RoundRecord", "run_rounds", "site_of"]

logger = logging.getLogger(__name__)

_SITE_SUFFIX = re.compile(r"\(site ([\w.-]{1,64})\)$")
"""A refusal names its site at the end of the reason (an Error reply has no site record)."""

EvaluateFn = Callable[[int, ArrayRecord], dict[str, float] | None]
RoundFn = Callable[["RoundRecord", "FederationState"], None]


@dataclass
class RoundRecord:
    """What happened in one round; one entry of ``results.json``'s ``rounds``."""

    round: int
    accuracy: float | None = None
    """The coordinator's held-out accuracy (None: regression, or no central evaluation)."""
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """Every held-out metric of the task (:mod:`fedinfer.tasks`), e.g. rmse, mae, r2."""
    federated: dict[str, float] = field(default_factory=dict)
    """The sites' sample-weighted evaluation of this round's global model."""
    federated_via: str | None = None
    """How ``federated`` came: ``"evaluate"`` (an evaluate exchange at the end of this round),
    ``"train"`` (with the next round's train replies), ``"pending"`` (the next round's train
    exchange will carry it), None (no evaluation: too few sites may or did evaluate)."""
    train: dict[str, float] = field(default_factory=dict)
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    secagg: dict[str, Any] = field(default_factory=dict)
    aggregated: bool = False
    duration_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: ``train`` (the train exchange, with the previous round's evaluation
    riding on it), ``aggregate`` (with secure aggregation: its unmask exchange), ``evaluate``
    (an evaluate exchange of its own: the last round's), ``central``."""

    def to_json(self) -> dict[str, Any]:
        """The JSON form written to ``results.json``."""
        return dict(vars(self))


@dataclass
class FederationState:
    """Everything the loop needs to continue: the model, the round reached, who can still train."""

    arrays: ArrayRecord
    completed_round: int = 0
    exhausted_nodes: set[int] = field(default_factory=set)
    unevaluable_nodes: set[int] = field(default_factory=set)
    """Sites whose policy refuses evaluation (DP mode): not asked again. Not checkpointed: after a
    resume one refused round finds them again."""
    site_names: dict[int, str] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    """Latest cumulative epsilon each site reported (kept for sites that did not train since)."""
    history: list[RoundRecord] = field(default_factory=list)
    stop_reason: str | None = None


def site_of(msg: Message, names: dict[int, str]) -> str:
    """The site id a reply names (remembered per node), else ``node-<id>``."""
    node_id = msg.metadata.src_node_id
    if not msg.has_error() and Keys.SITE in msg.content.config_records:
        names[node_id] = str(msg.content[Keys.SITE][Keys.SITE_ID])
    return names.get(node_id, f"node-{node_id}")


def _split_replies(
    replies: Iterable[Message], state: FederationState, record: RoundRecord
) -> list[Message]:
    """Record refusals and failures; remember sites that ran out of budget or refuse by policy.

    A policy refusal repeats every round (the request does not change), so the site is no
    longer sampled, exactly like a site whose budget is spent.
    """
    replies = list(replies)
    for msg in replies:
        site = site_of(msg, state.site_names)
        if not msg.has_error():
            continue
        reason = msg.error.reason or f"error code {msg.error.code}"
        if msg.error.code in (ErrorCodes.BUDGET_EXCEEDED, ErrorCodes.POLICY_REFUSED):
            named = _SITE_SUFFIX.search(reason)
            if named and msg.metadata.src_node_id not in state.site_names:
                site = state.site_names[msg.metadata.src_node_id] = named.group(1)
            record.refused[site] = reason.splitlines()[0][:500]
            state.exhausted_nodes.add(msg.metadata.src_node_id)
        else:
            record.failed[site] = reason.splitlines()[0][:500]
    return replies


def _record_site_metrics(
    replies: list[Message], state: FederationState, record: RoundRecord
) -> None:
    for msg in replies:
        if msg.has_error():
            continue
        site = site_of(msg, state.site_names)
        metrics = dict(msg.content.metric_records[Keys.METRICS])
        record.sites[site] = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
        if "epsilon" in metrics:
            state.epsilon[site] = float(metrics["epsilon"])  # type: ignore[arg-type]
            record.privacy[site] = {
                k: float(metrics[k])  # type: ignore[arg-type]
                for k in ("delta", "noise-multiplier", "sample-rate", "dp-steps")
                if k in metrics
            }


def run_rounds(
    *,
    grid: Grid,
    strategy: Strategy,
    state: FederationState,
    num_rounds: int,
    min_sites: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_fn: EvaluateFn | None = None,
    on_round_end: RoundFn | None = None,
    on_federated: RoundFn | None = None,
) -> FederationState:
    """Run rounds ``state.completed_round + 1 .. num_rounds``; stop early when too few can train.

    ``on_round_end`` is called once per round, when it ends; ``on_federated`` when an already
    finished round's federated metrics arrive (with the next round's train replies, see the
    module docstring). Returns the final state; ``state.stop_reason`` says why it ended
    early, if it did.
    """
    for server_round in range(state.completed_round + 1, num_rounds + 1):
        started = time.perf_counter()
        record = RoundRecord(round=server_round)
        trainable = ExcludingGrid(grid, state.exhausted_nodes)
        available = len(list(trainable.get_node_ids()))
        if available < min_sites:
            state.stop_reason = (
                f"only {available} site(s) can still train "
                f"(others {_refusal_summary(state)}); "
                f"`federation.min_sites`={min_sites}"
            )
            break

        # --- TRAINING (sites), the previous round's evaluation riding along -----------------
        previous = _pending(state)
        evaluation = (
            _evaluation_messages(grid, strategy, state, previous.round, min_sites=min_sites)
            if previous is not None
            else None
        )
        training = strategy.configure_train(
            server_round, state.arrays, ConfigRecord(dict(train_config)), trainable
        )
        train_replies, evaluate_replies = _train_exchange(
            grid, list(training), evaluation or [], state, timeout=timeout
        )
        replies = _split_replies(train_replies, state, record)
        stage = _stopwatch(record, "train", started)
        if previous is not None:
            _finish_late(previous, strategy, state, evaluation, evaluate_replies, on_federated)
        _record_site_metrics(replies, state, record)
        record.epsilon = dict(sorted(state.epsilon.items()))
        arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        stage = _stopwatch(record, "aggregate", stage)
        if arrays is not None:
            state.arrays, record.aggregated = arrays, True
        record.train = _floats(train_metrics)
        record.secagg = dict(getattr(strategy, "last_round_info", {}) or {})

        # --- EVALUATION (sites): now if no round follows, else with the next train exchange ---
        if _last_round(grid, strategy, state, server_round, num_rounds, min_sites=min_sites):
            _evaluate_now(grid, strategy, state, record, min_sites=min_sites, timeout=timeout)
            stage = _stopwatch(record, "evaluate", stage)
        else:
            record.federated_via = "pending"

        # --- EVALUATION (coordinator) -----------------------------------------------------
        if evaluate_fn is not None:
            central = evaluate_fn(server_round, state.arrays) or {}
            record.accuracy, record.loss = central.get("accuracy"), central.get("loss")
            record.metrics = {k: v for k, v in central.items() if k != "loss"}
            _stopwatch(record, "central", stage)

        record.duration_s = time.perf_counter() - started
        state.completed_round = server_round
        state.history.append(record)
        if on_round_end is not None:
            on_round_end(record, state)
        stop_reason = getattr(strategy, "stop_reason", None)
        if stop_reason:
            state.stop_reason = stop_reason
            break
    _close_pending(grid, strategy, state, min_sites=min_sites, timeout=timeout, fn=on_federated)
    return state


def _stopwatch(record: RoundRecord, name: str, since: float) -> float:
    """Record the seconds since ``since`` as stage ``name``; return now."""
    now = time.perf_counter()
    record.timings[name] = now - since
    return now


# --- federated evaluation ---------------------------------------------------------------------


def _pending(state: FederationState) -> RoundRecord | None:
    """The last round, if its federated evaluation still waits for a train exchange."""
    last = state.history[-1] if state.history else None
    return last if last is not None and last.federated_via == "pending" else None


def _last_round(
    grid: Grid,
    strategy: Strategy,
    state: FederationState,
    server_round: int,
    num_rounds: int,
    *,
    min_sites: int,
) -> bool:
    """Whether no train exchange follows this round (so its evaluation cannot ride on one)."""
    if server_round >= num_rounds or getattr(strategy, "stop_reason", None):
        return True
    return len(list(ExcludingGrid(grid, state.exhausted_nodes).get_node_ids())) < min_sites


def _evaluation_messages(
    grid: Grid, strategy: Strategy, state: FederationState, server_round: int, *, min_sites: int
) -> list[Message] | None:
    """The strategy's evaluate messages for the current model, by the sites that may evaluate.

    None when fewer than ``min_sites`` may: a site that refuses by policy (DP mode,
    ``allow_evaluation = false``) is not asked again, and Flower's sampling would wait for
    the missing ones forever.
    """
    evaluable = ExcludingGrid(grid, state.unevaluable_nodes)
    if len(list(evaluable.get_node_ids())) < min_sites:
        return None
    return list(strategy.configure_evaluate(server_round, state.arrays, ConfigRecord(), evaluable))


def _train_exchange(
    grid: Grid,
    training: list[Message],
    evaluation: list[Message],
    state: FederationState,
    *,
    timeout: float,
) -> tuple[list[Message], list[Message]]:
    """The train exchange with the evaluate requests riding along; returns both kinds of reply.

    Each evaluate request goes in the train message to its site (a ``Keys.EVALUATE``
    record), or as itself in the same exchange to a site that does not train. A request
    that could not ride (its site trains on other weights than the current model) or whose
    train reply is an error (the site refused to train, ran out of budget, failed) goes in
    a second exchange, as the separate evaluate exchange would have asked it.
    """
    trains = {m.metadata.dst_node_id: m for m in training}
    riding: dict[int, Message] = {}
    alone: list[Message] = []
    later: list[Message] = []
    for request in evaluation:
        node = request.metadata.dst_node_id
        msg = trains.get(node)
        if msg is None:
            alone.append(request)
        elif _same_arrays(msg.content.array_records.get(Keys.ARRAYS), state.arrays):
            riding[node] = request
            # Flower's strategies share one RecordDict between their messages: never mutate it.
            config = ConfigRecord(dict(request.content.config_records.get(Keys.CONFIG, {})))
            msg.content = RecordDict({**msg.content, Keys.EVALUATE: config})
        else:
            later.append(request)
    train_replies, evaluate_replies = _exchange(grid, training + alone, state, timeout=timeout)
    later += [
        riding[r.metadata.src_node_id]
        for r in train_replies
        if r.has_error() and r.metadata.src_node_id in riding
    ]
    if later:
        evaluate_replies += _exchange(grid, later, state, timeout=timeout)[1]
    # In the order the requests were made, as the separate exchange aggregated them (the
    # weighted mean is a float sum: the order decides its last bit).
    order = {m.metadata.dst_node_id: i for i, m in enumerate(evaluation)}
    evaluate_replies.sort(key=lambda m: order.get(m.metadata.src_node_id, len(order)))
    return train_replies, evaluate_replies


def _same_arrays(sent: ArrayRecord | None, arrays: ArrayRecord) -> bool:
    if sent is None or sent is arrays:
        return sent is arrays
    return list(sent) == list(arrays) and all(sent[k].data == arrays[k].data for k in arrays)


def _exchange(
    grid: Grid, messages: list[Message], state: FederationState, *, timeout: float
) -> tuple[list[Message], list[Message]]:
    """One exchange; returns its train replies and its evaluate replies.

    Each train reply's ride-along evaluation is taken out of it (the strategy's
    ``aggregate_train`` sees exactly what a site trained) and returned as an evaluate reply;
    a site that refused it by policy is not asked again.
    """
    if not messages:
        return [], []
    train, evaluate = [], []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.metadata.message_type != MessageType.TRAIN:
            evaluate.append(reply)
            continue
        train.append(reply)
        if reply.has_error():
            continue
        metrics = reply.content.metric_records.get(Keys.EVALUATION)
        refusal = reply.content.config_records.get(Keys.EVALUATION_REFUSED)
        reply.content.pop(Keys.EVALUATION, None)
        reply.content.pop(Keys.EVALUATION_REFUSED, None)
        if metrics is not None:  # shaped like the site's evaluate reply, for aggregate_evaluate
            answer = Message(RecordDict({Keys.METRICS: metrics}), 0, MessageType.EVALUATE)
            answer.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
            evaluate.append(answer)
        elif refusal is not None and refusal.get("code") == ErrorCodes.POLICY_REFUSED:
            state.unevaluable_nodes.add(reply.metadata.src_node_id)
    return train, evaluate


def _aggregate_evaluation(
    strategy: Strategy, state: FederationState, server_round: int, replies: list[Message]
) -> dict[str, float]:
    """``aggregate_evaluate`` over the answers; remember the sites that refused by policy."""
    for msg in replies:
        if msg.has_error() and msg.error.code == ErrorCodes.POLICY_REFUSED:
            state.unevaluable_nodes.add(msg.metadata.src_node_id)
    answered = [m for m in replies if not m.has_error()]
    return _floats(strategy.aggregate_evaluate(server_round, answered))


def _evaluate_now(
    grid: Grid,
    strategy: Strategy,
    state: FederationState,
    record: RoundRecord,
    *,
    min_sites: int,
    timeout: float,
) -> None:
    """An evaluate exchange of its own for ``record``'s round (the current model)."""
    messages = _evaluation_messages(grid, strategy, state, record.round, min_sites=min_sites)
    if messages is None:
        record.federated, record.federated_via = {}, None
        return
    replies = _exchange(grid, messages, state, timeout=timeout)[1]
    record.federated = _aggregate_evaluation(strategy, state, record.round, replies)
    record.federated_via = "evaluate" if record.federated else None


def _finish_late(
    record: RoundRecord,
    strategy: Strategy,
    state: FederationState,
    evaluation: list[Message] | None,
    replies: list[Message],
    fn: RoundFn | None,
) -> None:
    """Fill in a finished round's federated metrics that came with this train exchange."""
    if evaluation is None:
        record.federated, record.federated_via = {}, None
    else:
        record.federated = _aggregate_evaluation(strategy, state, record.round, replies)
        record.federated_via = "train" if record.federated else None
    if fn is not None:
        fn(record, state)


def _close_pending(
    grid: Grid,
    strategy: Strategy,
    state: FederationState,
    *,
    min_sites: int,
    timeout: float,
    fn: RoundFn | None,
) -> None:
    """After the loop: a round still waiting for a train exchange gets an exchange of its own.

    Only when a round that was to follow did not (a site vanished between rounds, or a
    resumed run with fewer rounds); the metrics describe the same model either way.
    """
    record = _pending(state)
    if record is None:
        return
    _evaluate_now(grid, strategy, state, record, min_sites=min_sites, timeout=timeout)
    if fn is not None:
        fn(record, state)


def _refusal_summary(state: FederationState) -> str:
    """Why sites stopped training: budget, or the policy keys they named."""
    reasons = [r for record in state.history for r in record.refused.values()]
    keys = sorted({r.split(":")[0] for r in reasons if r.startswith("policy ")})
    budget = any(not r.startswith("policy ") for r in reasons) or not keys
    parts = (["exhausted their privacy budget"] if budget else []) + (
        [f"refused by their site policy: {', '.join(keys)}"] if keys else []
    )
    return " or ".join(parts)


def _floats(metrics: MetricRecord | None) -> dict[str, float]:
    if metrics is None:
        return {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
