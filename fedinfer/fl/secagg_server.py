"""Secure aggregation as a strategy wrapper: the inner strategy only ever sees the sum.

:class:`SecAggStrategy` wraps any Flower strategy whose aggregate is a weighted
mean of updates (FedAvg, FedProx, FedAdam, FedAvgM). Per run, sites send their
public keys once (``query.secagg_setup``, only for sites whose keys the
coordinator lacks; a site asked again returns the same keys). Per round it adds
one exchange beyond FedAvg when every participant uploads, two after a dropout:

1. ``train``: the round's participant directory goes out with the model; each
   site replies with its masked, quantized, sample-weighted update and its
   signature of the round with every participant as survivor.
2. ``query.secagg_consistency`` (only if a participant did not upload): each
   survivor signs the survivor list (Bonawitz et al.'s consistency check).
3. ``query.secagg_unmask``: the signers, shown every signature, reveal what
   removes the masks of the sum.

The unmasked *sum* becomes one synthetic reply (global + mean update, weight =
total samples) handed to the inner strategy's ``aggregate_train``, so server
optimizers (FedAdam's moments, FedAvgM's momentum) work unchanged.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedinfer.config.schema import FedInferConfig
from fedinfer.errors import SecAggAbort
from fedinfer.fl.messages import Keys, MessageTypes
from fedinfer.fl.records import arrays_to_weights, weights_to_arrays
from fedinfer.fl.secagg_codec import config_to_wire, wire_to_records
from fedinfer.fl.secagg_site import RUN_ID, UPLOAD_ARRAYS
from fedinfer.secagg import (
    ConsistencyReply,
    MaskedUpload,
    PublicKeys,
    ServerSecAgg,
    SetupReply,
    UnmaskReply,
    flatten_arrays,
    resolve_threshold,
    unflatten_vector,
)

__all__ = ["SecAggStrategy"]

logger = logging.getLogger(__name__)


class SecAggStrategy(Strategy):
    """Wrap ``inner`` so that the coordinator never sees an individual site's update."""

    def __init__(self, inner: Strategy, *, cfg: FedInferConfig, grid: Grid) -> None:
        self.inner = inner
        self.cfg = cfg
        self.grid = grid
        self.directory: dict[int, PublicKeys] = {}
        self.last_round_info: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self._round: ServerSecAgg | None = None
        self._global: ArrayRecord | None = None
        self._run_id = 0
        self._faults = random.Random(cfg.seed + 7919)

    def summary(self) -> None:  # noqa: D102
        self.inner.summary()

    # --- set-up ---------------------------------------------------------------------------

    def _ensure_keys(self, node_ids: list[int]) -> None:
        """Collect public keys from sites the coordinator has none for (once per run per site)."""
        missing = [n for n in node_ids if n not in self.directory]
        if not missing:
            return
        messages = [
            Message(
                RecordDict({Keys.SECAGG: ConfigRecord({RUN_ID: self._run_id})}),
                n,
                MessageTypes.SECAGG_SETUP,
            )
            for n in missing
        ]
        # First contact with a site may include starting its runtime (a Ray actor, a ClientApp
        # process): give it the round timeout, not the dropout timeout of the unmask exchange.
        timeout = max(self.cfg.secagg.timeout_s, self.cfg.federation.round_timeout_s)
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error():
                logger.warning(
                    "site %s failed secure-aggregation set-up: %s",
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            setup = SetupReply.from_wire(config_to_wire(reply.content.config_records[Keys.SECAGG]))
            if setup.site_id != reply.metadata.src_node_id:
                logger.warning("ignoring set-up keys claimed for another node (%s)", setup.site_id)
                continue
            self.directory[setup.site_id] = setup.public_keys

    # --- exchange 1 -----------------------------------------------------------------------

    def _drop_plan(self, node_ids: list[int]) -> dict[int, str]:
        count = min(self.cfg.faults.drop_sites, len(node_ids))
        chosen = self._faults.sample(sorted(node_ids), count) if count else []
        return dict.fromkeys(chosen, self.cfg.faults.drop_stage)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample with the inner strategy, then send each participant the round's key directory."""
        self._round, self._global, self.last_round_info = None, arrays, {}
        # Stable across a resumed run (same fedinfer run id); sites key their replay guard by it.
        self._run_id = int(str(config.get(Keys.RUN_ID, "0")), 16) % (1 << 63)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        node_ids = [m.metadata.dst_node_id for m in messages]
        drops = self._drop_plan(node_ids)
        self._ensure_keys([n for n in node_ids if drops.get(n) != "before_keys"])
        participants = {
            n: self.directory[n]
            for n in node_ids
            if n in self.directory and drops.get(n) != "before_keys"
        }
        vector, _ = flatten_arrays(arrays_to_weights(arrays))
        try:
            self._round = ServerSecAgg(
                run_id=self._run_id,
                server_round=server_round,
                participants=participants,
                threshold=resolve_threshold(
                    self.cfg.secagg.threshold, num_sites=max(len(participants), 1)
                ),
                dim=vector.size,
                clip_range=self.cfg.secagg.clip_range,
                bits=self.cfg.secagg.bits,
            )
        except SecAggAbort as exc:
            self._abort(str(exc))
            return []
        round_record, _ = wire_to_records(self._round.config.to_wire())
        self.last_round_info = {
            "participants": len(participants),
            "threshold": self._round.config.threshold,
            "dropped_by_fault": len(drops),
        }
        return [
            self._train_message(m, round_record, drops.get(m.metadata.dst_node_id))
            for m in messages
        ]

    @staticmethod
    def _train_message(template: Message, round_record: ConfigRecord, fault: str | None) -> Message:
        config = ConfigRecord(dict(template.content.config_records[Keys.CONFIG]))
        if fault:
            config[Keys.FAULT_DROP] = fault
        content = RecordDict(
            {
                Keys.ARRAYS: template.content[Keys.ARRAYS],
                Keys.CONFIG: config,
                Keys.SECAGG: round_record,
            }
        )
        return Message(content, template.metadata.dst_node_id, MessageType.TRAIN)

    # --- exchange 2 and aggregation ---------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the survivors' uploads and let the inner strategy aggregate it."""
        if self._round is None or self._global is None:
            return None, None
        uploads = [
            r for r in replies if not r.has_error() and UPLOAD_ARRAYS in r.content.array_records
        ]
        try:
            for reply in uploads:
                wire = config_to_wire(
                    reply.content.config_records[Keys.SECAGG],
                    reply.content.array_records[UPLOAD_ARRAYS],
                )
                upload = MaskedUpload.from_wire(wire)
                if upload.site_id != reply.metadata.src_node_id:
                    raise SecAggAbort(
                        f"an upload from node {reply.metadata.src_node_id} "
                        f"claims to be {upload.site_id}"
                    )
                self._round.receive_upload(upload)
            result = self._unmask()
        except SecAggAbort as exc:
            self._abort(str(exc))
            return None, None
        finally:
            self._round = None
        self.last_round_info.update(
            survivors=len(result.survivors),
            dropped=len(result.dropped),
            responders=len(result.responders),
        )
        return self.inner.aggregate_train(server_round, [self._sum_reply(result, uploads)])

    def _messages(self, requests: dict[int, Any], message_type: str) -> list[Message]:
        messages = []
        for node_id, request in requests.items():
            record, _ = wire_to_records({**request.to_wire(), RUN_ID: self._run_id})
            messages.append(Message(RecordDict({Keys.SECAGG: record}), node_id, message_type))
        return messages

    def _unmask(self) -> Any:
        assert self._round is not None
        checks = self._round.consistency_requests()
        self.last_round_info["consistency_check"] = bool(checks)
        if checks:
            messages = self._messages(checks, MessageTypes.SECAGG_CONSISTENCY)
            for reply in self.grid.send_and_receive(messages, timeout=self.cfg.secagg.timeout_s):
                if reply.has_error():
                    continue
                signed = ConsistencyReply.from_wire(
                    config_to_wire(reply.content.config_records[Keys.SECAGG])
                )
                if signed.site_id == reply.metadata.src_node_id:
                    self._round.receive_consistency_reply(signed)
        requests = self._round.unmask_requests()
        messages = self._messages(requests, MessageTypes.SECAGG_UNMASK)
        for reply in self.grid.send_and_receive(messages, timeout=self.cfg.secagg.timeout_s):
            if reply.has_error():
                continue
            unmask = UnmaskReply.from_wire(
                config_to_wire(reply.content.config_records[Keys.SECAGG])
            )
            if unmask.site_id == reply.metadata.src_node_id:
                self._round.receive_unmask_reply(unmask)
        return self._round.finalize()

    def _sum_reply(self, result: Any, uploads: list[Message]) -> Message:
        """One reply that carries only what the sum reveals: global + mean update, total weight."""
        assert self._global is not None
        global_weights = arrays_to_weights(self._global)
        base, layout = flatten_arrays(global_weights)
        summed = unflatten_vector(base + result.mean_update, layout)
        new_weights = {k: summed[k].astype(global_weights[k].dtype) for k in global_weights}
        metrics = aggregate_metricrecords([u.content for u in uploads], "num-examples")
        metrics["num-examples"] = int(result.total_weight)
        content = RecordDict({Keys.ARRAYS: weights_to_arrays(new_weights), Keys.METRICS: metrics})
        return Message(content, 0, MessageType.TRAIN)

    def _abort(self, reason: str) -> None:
        self.last_round_info["aborted"] = reason
        logger.warning("secure aggregation round aborted: %s", reason)
        if self.cfg.secagg.on_abort == "stop":
            self.stop_reason = f"secure aggregation aborted: {reason} (`secagg.on_abort`=stop)"

    # --- evaluation is not secret: delegate ---------------------------------------------------

    def configure_evaluate(  # noqa: D102
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(  # noqa: D102
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
