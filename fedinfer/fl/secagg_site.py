"""The site's side of secure aggregation on Flower's Message API.

The site's private keys and its replay guard live in its state directory
(:class:`~fedinfer.secagg.store.RunStateStore`, sealed when the state is encrypted),
keyed by the protocol run id the coordinator sends with every secure-aggregation
message; Flower's ``Context.state`` lasts one Flower run only, so a resumed run or a
restarted site would otherwise forget which rounds it already masked. The state is
saved before a masked upload or a signature leaves the site.

Whom a site masks with comes from its policy, never the coordinator: with
``secagg_trusted_peers`` only participants endorsed by a listed identity key (the
sites of a simulation list each other: :func:`simulation_peers`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedinfer.config.schema import FedInferConfig
from fedinfer.errors import FedInferError, SecAggAbort
from fedinfer.fl.messages import ErrorCodes, Keys
from fedinfer.fl.secagg_codec import config_to_wire, wire_to_records
from fedinfer.fl.site import SiteEnv, local_train
from fedinfer.policy import SitePolicy, trusted_identities
from fedinfer.secagg import (
    ConsistencyReply,
    ConsistencyRequest,
    RoundConfig,
    SiteSecAgg,
    UnmaskReply,
    UnmaskRequest,
    flatten_arrays,
)
from fedinfer.secagg.store import RunStateStore, open_site

__all__ = [
    "RUN_ID",
    "SimulatedDropout",
    "secagg_consistency",
    "secagg_setup",
    "secagg_train",
    "secagg_unmask",
    "simulation_peers",
]

logger = logging.getLogger(__name__)

_Request = TypeVar("_Request", ConsistencyRequest, UnmaskRequest)
_FAULTS = "fedinfer-faults"
UPLOAD_ARRAYS = "secagg-masked"
RUN_ID = "run_id"
"""Key of the protocol run id in every secure-aggregation record the coordinator sends."""


class SimulatedDropout(FedInferError):
    """Raised by a site told by ``faults.*`` to vanish at this stage (simulations only)."""

    error_code = ErrorCodes.SIMULATED_DROPOUT


def _run_id_of(context: Context) -> str:
    """Flower's run id as the string the rest of the site uses (ledger, model store)."""
    return str(context.run_id)


def _site_record(env: SiteEnv) -> ConfigRecord:
    return ConfigRecord({Keys.SITE_ID: env.site_id})


def _options(policy: SitePolicy, store: RunStateStore) -> dict[str, Any]:
    """The site's own settings for the protocol: identity key, policy floors, trusted peers.

    Never from the run config, which the coordinator writes.
    """
    return {
        "min_threshold_fraction": policy.secagg_min_threshold,
        "min_participants": policy.secagg_min_participants,
        "identity": store.identity(),
        "require_endorsed": True,
        "trusted_identities": trusted_identities(policy),
    }


def simulation_peers(output_dir: Path, site_ids: list[str]) -> Path:
    """Make every simulated site's identity key and list them all as one peers file.

    The sites of one simulation run on one machine for one operator, so they trust each
    other's keys, and the default path checks them (``site_policy.secagg_trusted_peers``)
    as a deployment does. A site's key lives where its state does, ``sites/<id>/``, sealed
    when ``$FEDINFER_STATE_KEY_FILE`` names a state key (as the sites' own state is).
    """
    from fedinfer.crypto.at_rest import resolve_state_key
    from fedinfer.policy import PEERS_FILENAME, save_peers

    peers = {}
    for site_id in site_ids:
        state_dir = output_dir / "sites" / site_id
        key = resolve_state_key(None, protects=[state_dir])
        peers[site_id] = RunStateStore(state_dir, key=key).identity_public()
    return save_peers(peers, output_dir / PEERS_FILENAME)


def _wire(msg: Message) -> dict[str, Any]:
    if Keys.SECAGG not in msg.content.config_records:
        raise SecAggAbort("the message lacks its secure-aggregation record")
    return config_to_wire(msg.content.config_records[Keys.SECAGG])


def _protocol_run_id(wire: dict[str, Any]) -> int:
    run_id = wire.get(RUN_ID)
    if isinstance(run_id, bool) or not isinstance(run_id, int) or run_id < 0:
        raise SecAggAbort(f"the secure-aggregation message lacks a valid {RUN_ID!r}")
    return run_id


def _load(
    policy: SitePolicy, env: SiteEnv, context: Context, run_id: int
) -> tuple[RunStateStore, SiteSecAgg]:
    store = RunStateStore(env.state_dir, key=env.state_key)
    site = SiteSecAgg.from_state(store.load(run_id), **_options(policy, store))
    if site.site_id != context.node_id:
        raise SecAggAbort(f"the secure-aggregation state of run {run_id} is of another node")
    return store, site


def secagg_setup(
    *, env: SiteEnv, msg: Message, context: Context, policy: SitePolicy
) -> RecordDict:
    """Reply with this run's public keys; create (and durably save) them only the first time."""
    run_id = _protocol_run_id(_wire(msg))
    store = RunStateStore(env.state_dir, key=env.state_key)
    with store.locked(run_id):
        site, created = open_site(
            store, site_id=context.node_id, run_id=run_id, **_options(policy, store)
        )
        if created:
            store.save(run_id, site.to_state())
    if created and policy.secagg_trusted_peers is None:  # once per run and site
        logger.warning(
            "site %s: its policy names no `secagg_trusted_peers`, so it accepts any participant "
            "with endorsed keys, including sites a coordinator makes up (Sybils) to unmask one "
            "site's update; list the real sites' `fedinfer site identity` lines in a peers file",
            env.site_id,
        )
    record, _ = wire_to_records(site.setup_reply().to_wire())
    return RecordDict({Keys.SECAGG: record, Keys.SITE: _site_record(env)})


def secagg_train(
    *,
    cfg: FedInferConfig,
    env: SiteEnv,
    msg: Message,
    context: Context,
    policy: SitePolicy,
    global_weights: dict[str, np.ndarray],
    server_round: int,
) -> RecordDict:
    """Train, then reply with the masked, quantized, sample-weighted update (never the update).

    The round is checked (replay guard, threshold floor, own keys) before any training, and
    the raised replay guard is on disk before the upload leaves.
    """
    fault = str(msg.content[Keys.CONFIG].get(Keys.FAULT_DROP, ""))
    if fault in ("before_keys", "after_keys"):
        raise SimulatedDropout(
            f"site {env.site_id} drops out ({fault}) as `faults.drop_stage` asks"
        )
    round_config = RoundConfig.from_wire(_wire(msg))
    run_id = round_config.run_id
    _, site = _load(policy, env, context, run_id)
    site.check_round(round_config)  # refuse before training; checked again under the lock
    outcome = local_train(
        cfg=cfg,
        env=env,
        global_weights=global_weights,
        server_round=server_round,
        run_id=_run_id_of(context),
    )
    new_vector, _ = flatten_arrays(outcome.weights)
    old_vector, _ = flatten_arrays(global_weights)
    store = RunStateStore(env.state_dir, key=env.state_key)
    with store.locked(run_id):
        _, site = _load(policy, env, context, run_id)  # fresh: another message may have run
        upload = site.mask_update(
            round_config, new_vector - old_vector, weight=len(env.data.train)
        )
        store.save(run_id, site.to_state())
    if fault == "after_upload":
        context.state[_FAULTS] = ConfigRecord({"drop-unmask-round": server_round})
    config, arrays = wire_to_records(upload.to_wire())
    assert arrays is not None
    return RecordDict(
        {
            Keys.SECAGG: config,
            UPLOAD_ARRAYS: arrays,
            Keys.METRICS: MetricRecord(dict(outcome.metrics)),
            Keys.SITE: _site_record(env),
        }
    )


def _dropping(context: Context, server_round: int) -> bool:
    faults = context.state.config_records.get(_FAULTS)
    return (
        faults is not None and int(cast(int, faults.get("drop-unmask-round", -1))) == server_round
    )


def _answer(
    *,
    env: SiteEnv,
    msg: Message,
    context: Context,
    policy: SitePolicy,
    parse: Callable[[dict[str, Any]], _Request],
    act: Callable[[SiteSecAgg, _Request], ConsistencyReply | UnmaskReply],
) -> RecordDict:
    """Answer a request about the pending round with ``act(site, parse(wire))``.

    Under the run's lock; the new state is saved before the reply leaves.
    """
    wire = _wire(msg)
    request = parse(wire)
    if _dropping(context, request.server_round):
        raise SimulatedDropout(
            f"site {env.site_id} drops out (after_upload) as `faults.drop_stage` asks"
        )
    run_id = _protocol_run_id(wire)
    store = RunStateStore(env.state_dir, key=env.state_key)
    with store.locked(run_id):
        _, site = _load(policy, env, context, run_id)
        reply = act(site, request)
        store.save(run_id, site.to_state())
    record, _ = wire_to_records(reply.to_wire())
    return RecordDict({Keys.SECAGG: record, Keys.SITE: _site_record(env)})


def secagg_consistency(
    *, env: SiteEnv, msg: Message, context: Context, policy: SitePolicy
) -> RecordDict:
    """Sign the survivor list of the pending round (only asked after a dropout)."""
    return _answer(
        env=env,
        msg=msg,
        context=context,
        policy=policy,
        parse=ConsistencyRequest.from_wire,
        act=SiteSecAgg.sign_survivors,
    )


def secagg_unmask(
    *, env: SiteEnv, msg: Message, context: Context, policy: SitePolicy
) -> RecordDict:
    """Reveal shares of surviving sites' self-mask seeds and seeds shared with dropped sites."""
    return _answer(
        env=env,
        msg=msg,
        context=context,
        policy=policy,
        parse=UnmaskRequest.from_wire,
        act=SiteSecAgg.unmask,
    )
