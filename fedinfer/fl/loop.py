"""The coordinator's round loop.

Flower's ``Strategy.start`` runs a fixed number of rounds from round 1. We need
more from the loop: resume from a checkpoint, sites that refuse (privacy budget,
or a request their own policy forbids: ``refused: policy <key>``) and must stop
being sampled, a clean end when too few sites can train, and a
hook after every round (results, progress, checkpoint). The strategy's own
``configure_*`` / ``aggregate_*`` methods are called exactly as ``start`` calls
them, so every Flower strategy (and our secure-aggregation wrapper) plugs in.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedinfer.fl.grid import ExcludingGrid
from fedinfer.fl.messages import ErrorCodes, Keys

__all__ = ["EvaluateFn", "FederationState", "RoundRecord", "run_rounds", "site_of"]

logger = logging.getLogger(__name__)

_SITE_SUFFIX = re.compile(r"\(site ([\w.-]{1,64})\)$")
"""A refusal names its site at the end of the reason (an Error reply has no site record)."""

EvaluateFn = Callable[[int, ArrayRecord], dict[str, float] | None]


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
    """Seconds per stage: ``train`` (the train exchange), ``aggregate`` (with secure
    aggregation: its unmask exchange), ``evaluate`` (the evaluate exchange), ``central``."""

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
        metrics = dict(next(iter(msg.content.metric_records.values())))
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
    on_round_end: Callable[[RoundRecord, FederationState], None] | None = None,
) -> FederationState:
    """Run rounds ``state.completed_round + 1 .. num_rounds``; stop early when too few can train.

    Returns the final state; ``state.stop_reason`` says why it ended early, if it did.
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

        # --- TRAINING (sites) -------------------------------------------------------------
        messages = strategy.configure_train(
            server_round, state.arrays, ConfigRecord(dict(train_config)), trainable
        )
        replies = _split_replies(grid.send_and_receive(messages, timeout=timeout), state, record)
        stage = _stopwatch(record, "train", started)
        _record_site_metrics(replies, state, record)
        record.epsilon = dict(sorted(state.epsilon.items()))
        arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        stage = _stopwatch(record, "aggregate", stage)
        if arrays is not None:
            state.arrays, record.aggregated = arrays, True
        record.train = _floats(train_metrics)
        record.secagg = dict(getattr(strategy, "last_round_info", {}) or {})

        # --- EVALUATION (sites) -----------------------------------------------------------
        record.federated = _evaluate_sites(
            grid, strategy, state, server_round, min_sites=min_sites, timeout=timeout
        )
        stage = _stopwatch(record, "evaluate", stage)

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
    return state


def _stopwatch(record: RoundRecord, name: str, since: float) -> float:
    """Record the seconds since ``since`` as stage ``name``; return now."""
    now = time.perf_counter()
    record.timings[name] = now - since
    return now


def _evaluate_sites(
    grid: Grid,
    strategy: Strategy,
    state: FederationState,
    server_round: int,
    *,
    min_sites: int,
    timeout: float,
) -> dict[str, float]:
    """Federated evaluation by the sites whose policy allows it; {} when too few do.

    A site that refuses by policy (DP mode, ``allow_evaluation = false``) is not asked again,
    and with fewer than ``min_sites`` left the exchange is skipped (Flower's sampling would
    wait for them forever).
    """
    evaluable = ExcludingGrid(grid, state.unevaluable_nodes)
    if len(list(evaluable.get_node_ids())) < min_sites:
        return {}
    messages = strategy.configure_evaluate(server_round, state.arrays, ConfigRecord(), evaluable)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for msg in replies:
        if msg.has_error() and msg.error.code == ErrorCodes.POLICY_REFUSED:
            state.unevaluable_nodes.add(msg.metadata.src_node_id)
    answered = [m for m in replies if not m.has_error()]
    return _floats(strategy.aggregate_evaluate(server_round, answered))


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
