"""The site's ClientApp: train, evaluate, accept a published model, secure aggregation.

Handlers turn every user-facing failure into an ``Error`` reply (Flower's
convention) rather than crashing the node: the coordinator records the reason
and carries on with the other sites.

Every train and evaluate request is first checked against the site's own policy
(:mod:`fedinfer.policy`): in a simulation the ``site_policy`` config group, in a
deployment the policy file ``fedinfer site`` names in the node config. The
coordinator's run config is only ever a request; a violation is an ``Error``
reply naming the policy key, and only the metrics the policy allows leave.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedinfer.artifacts import ModelStore, key_fingerprint, load_public_key
from fedinfer.config.schema import FedInferConfig
from fedinfer.errors import (
    FedInferError,
    ModelIntegrityError,
    PolicyViolation,
    PrivacyBudgetExceeded,
    SecAggAbort,
)
from fedinfer.fl.messages import ErrorCodes, Keys, MessageTypes
from fedinfer.fl.records import arrays_to_weights, weights_to_arrays
from fedinfer.fl.run_config import NodeConfigKeys, run_id_of
from fedinfer.fl.site import SiteEnv, SiteResolver, local_evaluate, local_train
from fedinfer.policy import (
    POLICY_FILENAME,
    SitePolicy,
    check_evaluate,
    check_secagg_peers,
    check_secagg_round,
    check_train,
    load_policy,
    release_metrics,
    site_config,
    validate_policy,
)

__all__ = [
    "PolicyFn",
    "build_client_app",
    "evaluate_before_training",
    "node_policy",
    "simulation_policy",
]

logger = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]
PolicyFn = Callable[[FedInferConfig, Context], SitePolicy]


def simulation_policy(cfg: FedInferConfig, context: Context) -> SitePolicy:
    """A simulated site's policy: the ``site_policy`` group, which the coordinator never sends."""
    return validate_policy(cfg.site_policy, source="`site_policy`")


def node_policy(cfg: FedInferConfig, context: Context) -> SitePolicy:
    """A deployed site's policy: the file in its node config, else ``<state-dir>/site_policy.toml``.

    Never from the run config (the coordinator writes that). A site without a policy file
    refuses every request (``fedinfer site init-policy`` writes the strict default).
    """
    node = context.node_config
    if NodeConfigKeys.POLICY_FILE in node:
        path = Path(str(node[NodeConfigKeys.POLICY_FILE]))
    elif NodeConfigKeys.STATE_DIR in node:
        path = Path(str(node[NodeConfigKeys.STATE_DIR])) / POLICY_FILENAME
    else:
        raise PolicyViolation(
            "policy_file",
            "policy policy_file: this site has no policy; start it with `fedinfer site`",
        )
    return load_policy(path)


def _site_record(env: SiteEnv) -> ConfigRecord:
    return ConfigRecord({Keys.SITE_ID: env.site_id})


def _guarded(handler: Callable[[Message, Context], RecordDict]) -> Handler:
    """Reply with an ``Error`` for a fedinfer error instead of crashing the node."""

    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return Message(handler(msg, context), reply_to=msg)
        except PrivacyBudgetExceeded as exc:
            return Message(Error(code=ErrorCodes.BUDGET_EXCEEDED, reason=str(exc)), reply_to=msg)
        except SecAggAbort as exc:
            return Message(Error(code=ErrorCodes.SECAGG_ABORT, reason=str(exc)), reply_to=msg)
        except ModelIntegrityError as exc:
            return Message(Error(code=ErrorCodes.MODEL_REJECTED, reason=str(exc)), reply_to=msg)
        except PolicyViolation as exc:
            logger.warning("site refused a request: %s", exc)
            return Message(Error(code=ErrorCodes.POLICY_REFUSED, reason=str(exc)), reply_to=msg)
        except FedInferError as exc:
            code = int(getattr(exc, "error_code", ErrorCodes.SITE_ERROR))
            return Message(Error(code=code, reason=str(exc)), reply_to=msg)

    return wrapped


def build_client_app(
    *,
    config_fn: Callable[[Context], FedInferConfig],
    resolver_fn: Callable[[FedInferConfig], SiteResolver],
    policy_fn: PolicyFn = simulation_policy,
) -> ClientApp:
    """Build the site ClientApp.

    Parameters
    ----------
    config_fn : callable
        Returns the run's typed config for a context (simulation: a closure over the
        config; deployment: decoded from ``context.run_config``): the coordinator's request.
    resolver_fn : callable
        Builds the :data:`SiteResolver` that tells a site who it is.
    policy_fn : callable
        Returns the site's own policy (default: :func:`simulation_policy`; a deployment
        passes :func:`node_policy`).
    """
    app = ClientApp()

    def env_of(context: Context) -> tuple[FedInferConfig, SiteEnv]:
        cfg = config_fn(context)
        return cfg, resolver_fn(cfg)(context)

    @app.train()
    @_guarded
    def train(msg: Message, context: Context) -> RecordDict:
        request, env = env_of(context)
        policy = policy_fn(request, context)
        try:
            check_train(policy, request, num_samples=len(env.data.train))
            if request.secagg.enabled:
                check_secagg_request(policy, msg)
        except PolicyViolation as exc:  # an Error reply carries no site record: name it here
            raise PolicyViolation(exc.key, f"{exc} (site {env.site_id})") from None
        cfg = site_config(policy, request, num_samples=len(env.data.train))
        config = msg.content.config_records[Keys.CONFIG]
        server_round = int(cast(int, config[Keys.SERVER_ROUND]))
        global_weights = arrays_to_weights(msg.content.array_records[Keys.ARRAYS])
        evaluation = (
            evaluate_before_training(request, env, policy, global_weights)
            if Keys.EVALUATE in msg.content.config_records
            else {}
        )
        if cfg.secagg.enabled:
            from fedinfer.fl.secagg_site import secagg_train

            content = secagg_train(
                cfg=cfg,
                env=env,
                msg=msg,
                context=context,
                global_weights=global_weights,
                server_round=server_round,
                policy=policy,
            )
            metrics = {
                k: float(cast(float, v)) for k, v in content.metric_records[Keys.METRICS].items()
            }
            content[Keys.METRICS] = MetricRecord(release_metrics(policy, cfg, metrics))
            return RecordDict({**content, **evaluation})
        outcome = local_train(
            cfg=cfg,
            env=env,
            global_weights=global_weights,
            server_round=server_round,
            run_id=run_id_of(config, context),
        )
        return RecordDict(
            {
                Keys.ARRAYS: weights_to_arrays(outcome.weights),
                Keys.METRICS: MetricRecord(release_metrics(policy, cfg, dict(outcome.metrics))),
                Keys.SITE: _site_record(env),
                **evaluation,
            }
        )

    @app.evaluate()
    @_guarded
    def evaluate(msg: Message, context: Context) -> RecordDict:
        request = config_fn(context)
        check_evaluate(policy_fn(request, context), request)
        cfg, env = env_of(context)
        metrics = local_evaluate(
            cfg=cfg,
            env=env,
            global_weights=arrays_to_weights(msg.content.array_records[Keys.ARRAYS]),
        )
        return RecordDict({Keys.METRICS: MetricRecord(dict(metrics)), Keys.SITE: _site_record(env)})

    @app.query(MessageTypes.DEPLOY.split(".")[1])
    @_guarded
    def deploy(msg: Message, context: Context) -> RecordDict:
        cfg, env = env_of(context)
        version = accept_artifact(
            env, msg.content.config_records[Keys.ARTIFACT], policy=policy_fn(cfg, context)
        )
        return RecordDict(
            {
                Keys.METRICS: MetricRecord({"version": version}),
                Keys.SITE: _site_record(env),
            }
        )

    @app.query(MessageTypes.SECAGG_SETUP.split(".")[1])
    @_guarded
    def secagg_setup(msg: Message, context: Context) -> RecordDict:
        from fedinfer.fl.secagg_site import secagg_setup as setup

        cfg, env = env_of(context)
        return setup(env=env, msg=msg, context=context, policy=policy_fn(cfg, context))

    @app.query(MessageTypes.SECAGG_CONSISTENCY.split(".")[1])
    @_guarded
    def secagg_consistency(msg: Message, context: Context) -> RecordDict:
        from fedinfer.fl.secagg_site import secagg_consistency as consistency

        cfg, env = env_of(context)
        return consistency(env=env, msg=msg, context=context, policy=policy_fn(cfg, context))

    @app.query(MessageTypes.SECAGG_UNMASK.split(".")[1])
    @_guarded
    def secagg_unmask(msg: Message, context: Context) -> RecordDict:
        from fedinfer.fl.secagg_site import secagg_unmask as unmask

        cfg, env = env_of(context)
        return unmask(env=env, msg=msg, context=context, policy=policy_fn(cfg, context))

    return app


def evaluate_before_training(
    request: FedInferConfig,
    env: SiteEnv,
    policy: SitePolicy,
    global_weights: dict[str, np.ndarray],
) -> dict[str, MetricRecord | ConfigRecord]:
    """A train message's ride-along evaluation: the records the train reply adds.

    The coordinator asks (``Keys.EVALUATE``) instead of sending an evaluate message
    (:mod:`fedinfer.fl.loop`); the site checks the request against its policy exactly as an
    evaluate message, and evaluates the model it is about to train on. A refusal (or an
    evaluation that fails) does not stop the training: the reply carries
    ``Keys.EVALUATION_REFUSED`` instead of ``Keys.EVALUATION``. The metrics are an evaluate
    reply's, in the clear, beside the (possibly masked) update.
    """
    try:
        check_evaluate(policy, request)
        metrics = local_evaluate(cfg=request, env=env, global_weights=global_weights)
    except FedInferError as exc:
        policy_refused = isinstance(exc, PolicyViolation)
        code = ErrorCodes.POLICY_REFUSED if policy_refused else ErrorCodes.SITE_ERROR
        logger.warning("site %s did not evaluate: %s", env.site_id, exc)
        refusal = {"code": code, "reason": f"{exc} (site {env.site_id})"[:500]}
        return {Keys.EVALUATION_REFUSED: ConfigRecord(refusal)}
    return {Keys.EVALUATION: MetricRecord(dict(metrics))}


def check_secagg_request(policy: SitePolicy, msg: Message) -> None:
    """Check the round's secure-aggregation threshold and participants against the policy.

    The participants must be the site's listed peers when its policy names them
    (``secagg_trusted_peers``): no participant of the coordinator's own making.
    """
    from fedinfer.fl.secagg_codec import config_to_wire
    from fedinfer.secagg import RoundConfig

    if Keys.SECAGG not in msg.content.config_records:
        raise SecAggAbort("the train message carries no secure-aggregation round config")
    round_config = RoundConfig.from_wire(config_to_wire(msg.content.config_records[Keys.SECAGG]))
    check_secagg_round(
        policy, threshold=round_config.threshold, participants=len(round_config.participants)
    )
    check_secagg_peers(policy, round_config, site_id=msg.metadata.dst_node_id)


def accept_artifact(env: SiteEnv, record: ConfigRecord, *, policy: SitePolicy | None = None) -> int:
    """Verify a published artifact and store it in the site's ModelStore.

    The artifact goes from the message to the store in memory: with a state key it
    reaches the disk only sealed.

    Raises
    ------
    ModelIntegrityError
        The site has no coordinator key, or the signature / hash does not verify.
    PolicyViolation
        The coordinator key is not the one ``policy.coordinator_key_fingerprint`` pins.
    """
    if env.coordinator_public_key is None:
        raise ModelIntegrityError(
            f"site {env.site_id} has no coordinator public key configured; "
            "it refuses unsigned models"
        )
    public_key = load_public_key(env.coordinator_public_key)
    pinned = policy.coordinator_key_fingerprint if policy is not None else None
    if pinned is not None and key_fingerprint(public_key) != pinned.lower():
        raise PolicyViolation(
            "coordinator_key_fingerprint",
            f"policy coordinator_key_fingerprint: {env.coordinator_public_key} has fingerprint "
            f"{key_fingerprint(public_key)}, the site pins {pinned}",
        )
    store = ModelStore(env.state_dir / "models", key=env.state_key)
    try:
        return store.publish_bytes(
            bytes(cast(bytes, record[Keys.MANIFEST])),
            bytes(cast(bytes, record[Keys.WEIGHTS])),
            public_key=public_key,
            source=f"model published to {env.site_id}",
        )
    except ModelIntegrityError as exc:
        logger.warning("site %s rejected a published model: %s", env.site_id, exc)
        raise
