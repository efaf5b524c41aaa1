"""Message types, record keys and error codes shared by the ServerApp and the ClientApp."""

from __future__ import annotations

__all__ = ["ErrorCodes", "Keys", "MessageTypes"]


class MessageTypes:
    """``<category>.<action>`` message types beyond Flower's plain ``train`` / ``evaluate``."""

    DEPLOY = "query.deploy"
    SECAGG_SETUP = "query.secagg_setup"
    SECAGG_UNMASK = "query.secagg_unmask"
    SECAGG_CONSISTENCY = "query.secagg_consistency"


class Keys:
    """Record names inside message contents."""

    ARRAYS = "arrays"
    CONFIG = "config"
    METRICS = "metrics"
    SITE = "site"
    SITE_ID = "site-id"
    ARTIFACT = "artifact"
    MANIFEST = "manifest"
    WEIGHTS = "weights"
    SECAGG = "secagg"
    SERVER_ROUND = "server-round"
    RUN_ID = "run-id"
    FAULT_DROP = "fault-drop"
    EVALUATE = "evaluate"
    """In a train message: also evaluate its model before training (the evaluate config)."""
    EVALUATION = "evaluation"
    """In a train reply: the site's evaluation of the model it was sent (an evaluate reply's
    metrics), a record of its own beside the train metrics."""
    EVALUATION_REFUSED = "evaluation-refused"
    """In a train reply: the site did not evaluate (``code``, ``reason``), but trained."""


class ErrorCodes:
    """``Error.code`` values a site replies with instead of crashing.

    Flower's own codes are small integers; ours start at 4000.
    """

    BUDGET_EXCEEDED = 4001
    SITE_ERROR = 4002
    SECAGG_ABORT = 4003
    SIMULATED_DROPOUT = 4004
    MODEL_REJECTED = 4005
    POLICY_REFUSED = 4006
    WORKER_UNREACHABLE = 4007
    """Reserved: the removed per-message forwarder found no site worker (no longer sent)."""
