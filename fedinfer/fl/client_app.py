"""The site's ClientApp: train, evaluate, accept a published model, secure aggregation.

Handlers turn every user-facing failure into an ``Error`` reply (Flower's
convention) rather than crashing the node: the coordinator records the reason
and carries on with the other sites.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedinfer.artifacts import ModelStore, load_public_key
from fedinfer.config.schema import FedInferConfig
from fedinfer.errors import FedInferError, ModelIntegrityError, PrivacyBudgetExceeded, SecAggAbort
from fedinfer.fl.messages import ErrorCodes, Keys, MessageTypes
from fedinfer.fl.records import arrays_to_weights, weights_to_arrays
from fedinfer.fl.site import SiteEnv, SiteResolver, local_evaluate, local_train

__all__ = ["build_client_app"]

logger = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]


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
        except FedInferError as exc:
            code = int(getattr(exc, "error_code", ErrorCodes.SITE_ERROR))
            return Message(Error(code=code, reason=str(exc)), reply_to=msg)

    return wrapped


def build_client_app(
    *,
    config_fn: Callable[[Context], FedInferConfig],
    resolver_fn: Callable[[FedInferConfig], SiteResolver],
) -> ClientApp:
    """Build the site ClientApp.

    Parameters
    ----------
    config_fn : callable
        Returns the run's typed config for a context (simulation: a closure over the
        config; deployment: decoded from ``context.run_config``).
    resolver_fn : callable
        Builds the :data:`SiteResolver` that tells a site who it is.
    """
    app = ClientApp()

    def env_of(context: Context) -> tuple[FedInferConfig, SiteEnv]:
        cfg = config_fn(context)
        return cfg, resolver_fn(cfg)(context)

    @app.train()
    @_guarded
    def train(msg: Message, context: Context) -> RecordDict:
        cfg, env = env_of(context)
        config = msg.content.config_records[Keys.CONFIG]
        server_round = int(cast(int, config[Keys.SERVER_ROUND]))
        global_weights = arrays_to_weights(msg.content.array_records[Keys.ARRAYS])
        if cfg.secagg.enabled:
            from fedinfer.fl.secagg_site import secagg_train

            return secagg_train(
                cfg=cfg,
                env=env,
                msg=msg,
                context=context,
                global_weights=global_weights,
                server_round=server_round,
            )
        outcome = local_train(
            cfg=cfg,
            env=env,
            global_weights=global_weights,
            server_round=server_round,
            run_id=str(context.run_id),
        )
        return RecordDict(
            {
                Keys.ARRAYS: weights_to_arrays(outcome.weights),
                Keys.METRICS: MetricRecord(dict(outcome.metrics)),
                Keys.SITE: _site_record(env),
            }
        )

    @app.evaluate()
    @_guarded
    def evaluate(msg: Message, context: Context) -> RecordDict:
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
        _, env = env_of(context)
        version = accept_artifact(env, msg.content.config_records[Keys.ARTIFACT])
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
        return setup(cfg=cfg, env=env, msg=msg, context=context)

    @app.query(MessageTypes.SECAGG_CONSISTENCY.split(".")[1])
    @_guarded
    def secagg_consistency(msg: Message, context: Context) -> RecordDict:
        from fedinfer.fl.secagg_site import secagg_consistency as consistency

        cfg, env = env_of(context)
        return consistency(cfg=cfg, env=env, msg=msg, context=context)

    @app.query(MessageTypes.SECAGG_UNMASK.split(".")[1])
    @_guarded
    def secagg_unmask(msg: Message, context: Context) -> RecordDict:
        from fedinfer.fl.secagg_site import secagg_unmask as unmask

        cfg, env = env_of(context)
        return unmask(cfg=cfg, env=env, msg=msg, context=context)

    return app


def accept_artifact(env: SiteEnv, record: ConfigRecord) -> int:
    """Verify a published artifact and store it in the site's ModelStore.

    The artifact goes from the message to the store in memory: with a state key it
    reaches the disk only sealed.

    Raises
    ------
    ModelIntegrityError
        The site has no coordinator key, or the signature / hash does not verify.
    """
    if env.coordinator_public_key is None:
        raise ModelIntegrityError(
            f"site {env.site_id} has no coordinator public key configured; "
            "it refuses unsigned models"
        )
    public_key = load_public_key(env.coordinator_public_key)
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
