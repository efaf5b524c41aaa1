"""The site's side of secure aggregation on Flower's Message API.

The site's private keys live in ``Context.state``, which Flower keeps on the
site's own SuperNode for the run and never sends anywhere.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedinfer.config.schema import FedInferConfig
from fedinfer.errors import FedInferError, SecAggAbort
from fedinfer.fl.messages import ErrorCodes, Keys
from fedinfer.fl.secagg_codec import config_to_wire, wire_to_records
from fedinfer.fl.site import SiteEnv, local_train
from fedinfer.secagg import RoundConfig, SiteSecAgg, UnmaskRequest, flatten_arrays

__all__ = ["SimulatedDropout", "secagg_setup", "secagg_train", "secagg_unmask"]

_STATE = "fedinfer-secagg"
_FAULTS = "fedinfer-faults"
UPLOAD_ARRAYS = "secagg-masked"


class SimulatedDropout(FedInferError):
    """Raised by a site told by ``faults.*`` to vanish at this stage (simulations only)."""

    error_code = ErrorCodes.SIMULATED_DROPOUT


def _site_record(env: SiteEnv) -> ConfigRecord:
    return ConfigRecord({Keys.SITE_ID: env.site_id})


def _load(context: Context) -> SiteSecAgg:
    if _STATE not in context.state.config_records:
        raise SecAggAbort(
            "this site has no secure-aggregation keys for the run; the set-up was missed"
        )
    return SiteSecAgg.from_state(config_to_wire(context.state.config_records[_STATE]))


def _save(context: Context, site: SiteSecAgg) -> None:
    record, _ = wire_to_records(site.to_state())
    context.state[_STATE] = record


def secagg_setup(*, env: SiteEnv, msg: Message, context: Context) -> RecordDict:
    """Generate this run's key pairs, keep the private halves, reply with the public ones."""
    site = SiteSecAgg.create(site_id=context.node_id)
    _save(context, site)
    record, _ = wire_to_records(site.setup_reply().to_wire())
    return RecordDict({Keys.SECAGG: record, Keys.SITE: _site_record(env)})


def secagg_train(
    *,
    cfg: FedInferConfig,
    env: SiteEnv,
    msg: Message,
    context: Context,
    global_weights: dict[str, np.ndarray],
    server_round: int,
) -> RecordDict:
    """Train, then reply with the masked, quantized, sample-weighted update (never the update)."""
    fault = str(msg.content[Keys.CONFIG].get(Keys.FAULT_DROP, ""))
    if fault in ("before_keys", "after_keys"):
        raise SimulatedDropout(
            f"site {env.site_id} drops out ({fault}) as `faults.drop_stage` asks"
        )
    site = _load(context)
    round_config = RoundConfig.from_wire(config_to_wire(msg.content.config_records[Keys.SECAGG]))
    outcome = local_train(
        cfg=cfg,
        env=env,
        global_weights=global_weights,
        server_round=server_round,
        run_id=str(context.run_id),
    )
    new_vector, _ = flatten_arrays(outcome.weights)
    old_vector, _ = flatten_arrays(global_weights)
    upload = site.mask_update(round_config, new_vector - old_vector, weight=len(env.data.train))
    _save(context, site)
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


def secagg_unmask(*, env: SiteEnv, msg: Message, context: Context) -> RecordDict:
    """Reveal shares of surviving sites' self-mask seeds and seeds shared with dropped sites."""
    request = UnmaskRequest.from_wire(config_to_wire(msg.content.config_records[Keys.SECAGG]))
    faults = context.state.config_records.get(_FAULTS)
    if (
        faults is not None
        and int(cast(int, faults.get("drop-unmask-round", -1))) == request.server_round
    ):
        raise SimulatedDropout(
            f"site {env.site_id} drops out (after_upload) as `faults.drop_stage` asks"
        )
    site = _load(context)
    reply = site.unmask(request)
    _save(context, site)
    record, _ = wire_to_records(reply.to_wire())
    return RecordDict({Keys.SECAGG: record, Keys.SITE: _site_record(env)})
