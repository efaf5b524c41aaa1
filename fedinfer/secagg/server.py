"""The coordinator side of one secure-aggregation round.

A :class:`ServerSecAgg` lives for one round::

    server = ServerSecAgg(run_id=..., server_round=r, participants=directory, threshold=t,
                          dim=d, clip_range=c, bits=b)
    config = server.config                        # exchange 1: send with the train message
    for upload in uploads: server.receive_upload(upload)
    checks = server.consistency_requests()        # empty unless a site dropped
    for reply in signed: server.receive_consistency_reply(reply)   # only then
    requests = server.unmask_requests()           # exchange 2: one request per survivor
    for reply in replies: server.receive_unmask_reply(reply)
    result = server.finalize()                    # weighted mean update and total weight

The server never holds an individual update in the clear: uploads are added into one
running masked sum on arrival and not kept (:meth:`ServerSecAgg.held_vectors` lists every
vector it holds), and the sum is unmasked only as a whole, once at least ``threshold``
survivors have answered. Before any site reveals anything it checks that at least
``threshold`` survivors signed the same configuration and survivor list: the signatures
come with the uploads when nobody dropped, and from one consistency exchange otherwise.

Dropouts
--------
- *before the round* (not in ``participants``): not part of the round at all;
- *after the keys, before uploading*: survivors reveal their pairwise seeds with it;
- *after uploading, before unmasking*: its self-mask seed is rebuilt from survivors' shares.

One combination cannot be recovered: a site that uploads but then does not answer the
unmask request, in a round where another site dropped before uploading. The pairwise mask
between those two is known only to them (long-term mask keys are never shared), so
:meth:`ServerSecAgg.finalize` raises :class:`SecAggAbort` and the round is lost.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedinfer.errors import ConfigError, SecAggAbort
from fedinfer.secagg.keys import (
    KEY_BYTES,
    ROUND_NONCE_BYTES,
    PublicKeys,
    seed_commitment,
    survivor_statement,
    verify,
)
from fedinfer.secagg.messages import (
    ConsistencyReply,
    ConsistencyRequest,
    MaskedUpload,
    RoundConfig,
    UnmaskReply,
    UnmaskRequest,
)
from fedinfer.secagg.prg import PAIRWISE_MASK, SELF_MASK, MaskExpander
from fedinfer.secagg.quantize import (
    MAX_BITS,
    MIN_BITS,
    dequantize_mean,
    levels,
    max_weight,
)
from fedinfer.secagg.shamir import Share, lagrange_coefficients, reconstruct_secret

__all__ = ["AggregateResult", "ServerSecAgg", "resolve_threshold"]


def resolve_threshold(threshold: float, *, num_sites: int) -> int:
    """Turn ``secagg.threshold`` into a share count for a round of ``num_sites`` sites.

    A value ``<= 1`` is a fraction of the round's sites (rounded up, at least 2); a larger
    value is an absolute count.

    Examples
    --------
    >>> resolve_threshold(0.6, num_sites=10), resolve_threshold(3, num_sites=10)
    (6, 3)
    """
    if threshold <= 0:
        raise ConfigError(
            f"`secagg.threshold` must be > 0 (got {threshold}); use a fraction "
            "of the round's sites (e.g. 0.6) or a count >= 2"
        )
    if threshold <= 1:
        return max(2, math.ceil(threshold * num_sites - 1e-9))
    if threshold != int(threshold):
        raise ConfigError(f"`secagg.threshold` above 1 must be a whole count (got {threshold})")
    return int(threshold)


@dataclass(frozen=True)
class AggregateResult:
    """What the coordinator learns from a round: the aggregate, nothing per site.

    Attributes
    ----------
    mean_update : numpy.ndarray
        float64 weighted mean of the survivors' clipped updates (``dim`` coordinates),
        within :func:`~fedinfer.secagg.quantize.quantization_bound` per coordinate.
    total_weight : int
        Sum of the survivors' weights (sample counts), exact.
    weighted_sum : numpy.ndarray
        int64 exact sum of ``weight * quantized update`` over the survivors.
    survivors, dropped, responders : tuple of int
        Sites whose upload arrived; participants whose upload did not; survivors that
        answered the unmask request.
    """

    mean_update: NDArray[np.float64]
    total_weight: int
    weighted_sum: NDArray[np.int64]
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    responders: tuple[int, ...]


class ServerSecAgg:
    """The coordinator's state and steps for one secure-aggregation round.

    Parameters
    ----------
    run_id, server_round : int
        Identify the round; bound into every derived seed.
    participants : mapping of int to PublicKeys
        The round's sites and their set-up public keys.
    threshold : int
        Shamir threshold: fewest survivors that can unmask (``2 <= threshold <= n``); see
        :func:`resolve_threshold`.
    dim : int
        Length of the flat update vector.
    clip_range : float
        ``secagg.clip_range``.
    bits : int
        ``secagg.bits``.
    round_nonce : bytes or None, optional
        16 bytes; None draws a fresh random nonce (default: None).

    Raises
    ------
    ConfigError
        If ``clip_range``, ``bits`` or ``threshold`` is out of range.
    SecAggAbort
        If the round has fewer participants than the threshold, or two share a public key.
    """

    def __init__(
        self,
        *,
        run_id: int,
        server_round: int,
        participants: Mapping[int, PublicKeys],
        threshold: int,
        dim: int,
        clip_range: float,
        bits: int,
        round_nonce: bytes | None = None,
    ) -> None:
        _check_settings(threshold=threshold, clip_range=clip_range, bits=bits, dim=dim)
        if len(participants) < threshold:
            raise SecAggAbort(
                f"round {server_round} has {len(participants)} participants, fewer than the "
                f"threshold {threshold}; sample more sites or lower `secagg.threshold`"
            )
        self.config = RoundConfig(
            run_id=run_id,
            server_round=server_round,
            round_nonce=os.urandom(ROUND_NONCE_BYTES) if round_nonce is None else round_nonce,
            threshold=threshold,
            clip_range=float(clip_range),
            bits=bits,
            dim=dim,
            participants={i: participants[i] for i in sorted(participants)},
        )
        self.config.check()
        self._masked_sum = np.zeros(dim + 1, dtype=np.uint64)
        self._commitments: dict[int, bytes] = {}
        self._sealed: dict[int, dict[int, bytes]] = {}  # sender -> recipient -> sealed share
        self._replies: dict[int, UnmaskReply] = {}
        self._signatures: dict[int, bytes] = {}  # signer -> signature of the survivor list
        self._digest = self.config.digest()
        self._survivors: tuple[int, ...] = ()
        self._dropped: tuple[int, ...] = ()
        self._phase = "upload"

    # --- exchange 1 --------------------------------------------------------------------

    def receive_upload(self, upload: MaskedUpload) -> None:
        """Add one site's masked upload into the running masked sum.

        Raises
        ------
        SecAggAbort
            If the upload is malformed, late, duplicated or from a non-participant; the
            round's state is then unchanged and the caller may count the site as dropped.
        """
        self._expect_phase("upload", "receive an upload")
        site = upload.site_id
        if site not in self.config.participants:
            raise SecAggAbort(
                f"site {site} is not a participant of round {self.config.server_round}"
            )
        if site in self._commitments:
            raise SecAggAbort(f"site {site} uploaded twice in round {self.config.server_round}")
        if upload.server_round != self.config.server_round:
            raise SecAggAbort(
                f"site {site} uploaded for round {upload.server_round}, not "
                f"{self.config.server_round}"
            )
        if upload.masked.shape != (self.config.dim + 1,) or upload.masked.dtype != np.uint64:
            raise SecAggAbort(
                f"site {site} uploaded a vector of shape {upload.masked.shape} "
                f"and dtype {upload.masked.dtype}; expected ({self.config.dim + 1},)"
                " uint64"
            )
        if set(upload.sealed_shares) != set(self.config.participants):
            raise SecAggAbort(f"site {site} did not seal one seed share per participant")
        statement = survivor_statement(self._digest, self.config.site_ids)
        if not verify(self.config.participants[site].sign, upload.signature, statement):
            raise SecAggAbort(f"site {site} did not sign the round's configuration")
        self._signatures[site] = upload.signature
        np.add(self._masked_sum, upload.masked, out=self._masked_sum)
        self._commitments[site] = upload.seed_commitment
        self._sealed[site] = dict(upload.sealed_shares)

    @property
    def uploaded(self) -> tuple[int, ...]:
        """Sites whose upload has arrived so far, ascending."""
        return tuple(sorted(self._commitments))

    # --- exchange 2 --------------------------------------------------------------------

    def consistency_requests(self) -> dict[int, ConsistencyRequest]:
        """Close the upload phase; if a participant dropped, ask each survivor to sign the list.

        Returns an empty dict when every participant uploaded: the signatures that came with
        the uploads already cover the full list, so no extra exchange is needed.

        Raises
        ------
        SecAggAbort
            If fewer than ``threshold`` uploads arrived.
        """
        self._close_uploads()
        if not self._dropped:
            self._phase = "unmask-ready"
            return {}
        self._signatures.clear()  # the upload signatures cover the full list, not this one
        self._phase = "consistency"
        return {
            site: ConsistencyRequest(
                site_id=site, server_round=self.config.server_round, survivors=self._survivors
            )
            for site in self._survivors
        }

    def receive_consistency_reply(self, reply: ConsistencyReply) -> None:
        """Record one survivor's signature of the survivor list.

        Raises
        ------
        SecAggAbort
            If the reply is not from a survivor, repeated, or the signature does not verify.
        """
        self._expect_phase("consistency", "receive a consistency reply")
        site = reply.site_id
        if site not in self._survivors or site in self._signatures:
            raise SecAggAbort(f"unexpected or repeated consistency reply from site {site}")
        statement = survivor_statement(self._digest, self._survivors)
        if reply.server_round != self.config.server_round or not verify(
            self.config.participants[site].sign, reply.signature, statement
        ):
            raise SecAggAbort(f"site {site} did not sign the survivor list it was sent")
        self._signatures[site] = reply.signature

    def _close_uploads(self) -> None:
        self._expect_phase("upload", "close the uploads")
        survivors = self.uploaded
        if len(survivors) < self.config.threshold:
            self._phase = "aborted"
            raise SecAggAbort(
                f"only {len(survivors)} of {len(self.config.participants)} sites uploaded in "
                f"round {self.config.server_round}; at least the threshold "
                f"{self.config.threshold} must, so the round is dropped unaggregated"
            )
        self._survivors = survivors
        self._dropped = tuple(i for i in self.config.site_ids if i not in self._commitments)

    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        """Build one unmask request per survivor that signed the survivor list.

        Called straight after the uploads, it first runs :meth:`consistency_requests`, which
        must find that nobody dropped.

        Raises
        ------
        SecAggAbort
            If fewer than ``threshold`` uploads arrived or survivors signed, or a participant
            dropped and the consistency exchange has not run.
        """
        if self._phase == "upload" and self.consistency_requests():
            self._phase = "aborted"
            raise SecAggAbort(
                "a participant dropped before uploading: run the consistency exchange "
                "(consistency_requests) before unmasking"
            )
        if self._phase not in ("unmask-ready", "consistency"):
            self._expect_phase("unmask-ready", "build unmask requests")
        signers = tuple(sorted(self._signatures))
        if len(signers) < self.config.threshold:
            self._phase = "aborted"
            raise SecAggAbort(
                f"only {len(signers)} survivors signed the survivor list of round "
                f"{self.config.server_round}; the threshold is {self.config.threshold}, so "
                "nothing is unmasked"
            )
        survivors = self._survivors
        requests = {
            receiver: UnmaskRequest(
                site_id=receiver,
                server_round=self.config.server_round,
                survivors=self._survivors,
                dropped=self._dropped,
                sealed_shares={sender: self._sealed[sender][receiver] for sender in survivors},
                signatures=dict(self._signatures),
            )
            for receiver in signers
        }
        self._sealed.clear()
        self._phase = "unmask"
        return requests

    def receive_unmask_reply(self, reply: UnmaskReply) -> None:
        """Record one survivor's seed shares and pairwise seeds.

        Raises
        ------
        SecAggAbort
            If the reply is malformed, duplicated or not from a survivor; the round's state
            is then unchanged and the caller may count the site as silent.
        """
        self._expect_phase("unmask", "receive an unmask reply")
        site = reply.site_id
        if site not in self._survivors or site in self._replies:
            raise SecAggAbort(f"unexpected or repeated unmask reply from site {site}")
        if reply.server_round != self.config.server_round:
            raise SecAggAbort(f"site {site} answered for round {reply.server_round}")
        if set(reply.seed_shares) != set(self._survivors):
            raise SecAggAbort(f"site {site} did not return one seed share per survivor")
        if set(reply.pairwise_seeds) != set(self._dropped):
            raise SecAggAbort(f"site {site} did not return one pairwise seed per dropped site")
        if any(len(seed) != KEY_BYTES for seed in reply.pairwise_seeds.values()):
            raise SecAggAbort(f"site {site} returned a malformed pairwise seed")
        point = self.config.share_point(site)
        for owner, raw in reply.seed_shares.items():
            try:
                share = Share.from_bytes(raw)
            except ValueError as exc:
                raise SecAggAbort(f"site {site} returned a malformed share of {owner}") from exc
            if share.x != point:
                raise SecAggAbort(f"site {site} returned a share that is not its own")
        self._replies[site] = reply

    # --- unmasking -----------------------------------------------------------------------

    def finalize(self) -> AggregateResult:
        """Remove all masks from the sum and return the weighted mean update.

        Raises
        ------
        SecAggAbort
            If fewer than ``threshold`` survivors answered, if the unrecoverable dropout
            combination of the module docstring happened, or if a reconstruction does not
            match its commitment (a site returned a bad share or seed).
        """
        self._expect_phase("unmask", "finalize")
        self._phase = "aborted"  # until it succeeds; a round is finalized at most once
        responders = tuple(sorted(self._replies))
        self._check_responders(responders)
        self_seeds = self._reconstruct_self_seeds(responders)
        expander = MaskExpander(self.config.dim + 1)
        for seed in self_seeds:
            expander.add_into(self._masked_sum, seed, purpose=SELF_MASK, subtract=True)
        for survivor in self._survivors if self._dropped else ():
            seeds = self._replies[survivor].pairwise_seeds
            for peer in self._dropped:
                # The survivor added +mask for a higher peer and -mask for a lower one.
                expander.add_into(
                    self._masked_sum, seeds[peer], purpose=PAIRWISE_MASK, subtract=peer > survivor
                )
        result = self._decode(responders)
        self._phase = "done"
        return result

    def _check_responders(self, responders: tuple[int, ...]) -> None:
        if len(responders) < self.config.threshold:
            raise SecAggAbort(
                f"only {len(responders)} survivors answered the unmask request of round "
                f"{self.config.server_round}; the threshold is {self.config.threshold}, so the "
                "sum stays masked and the round is dropped"
            )
        silent = sorted(set(self._survivors) - set(responders))
        if silent and self._dropped:
            raise SecAggAbort(
                f"site(s) {silent} uploaded but did not answer the unmask request while "
                f"site(s) {list(self._dropped)} dropped before uploading; their pairwise masks "
                "are known only to those sites, so round "
                f"{self.config.server_round} cannot be unmasked"
            )

    def _reconstruct_self_seeds(self, responders: tuple[int, ...]) -> list[bytes]:
        holders = responders[: self.config.threshold]
        coefficients = lagrange_coefficients([self.config.share_point(h) for h in holders])
        seeds = []
        for owner in self._survivors:
            shares = [Share.from_bytes(self._replies[h].seed_shares[owner]) for h in holders]
            try:
                seed = reconstruct_secret(shares, length=KEY_BYTES, coefficients=coefficients)
            except ValueError:
                seed = b""
            expected = seed_commitment(
                seed,
                run_id=self.config.run_id,
                server_round=self.config.server_round,
                round_nonce=self.config.round_nonce,
                site_id=owner,
            )
            if not seed or expected != self._commitments[owner]:
                raise SecAggAbort(
                    f"the self-mask seed of site {owner} rebuilt from the shares of sites "
                    f"{list(holders)} does not match its commitment; a site returned a bad share"
                )
            seeds.append(seed)
        return seeds

    def _decode(self, responders: tuple[int, ...]) -> AggregateResult:
        values = self._masked_sum.view(np.int64)
        weighted_sum, total_weight = values[:-1], int(values[-1])
        cfg = self.config
        weight_limit = len(self._survivors) * max_weight(
            num_sites=len(cfg.participants), bits=cfg.bits
        )
        bound = total_weight * levels(cfg.bits)
        if not 0 <= total_weight <= weight_limit or (
            weighted_sum.size
            and not -bound <= int(weighted_sum.min()) <= int(weighted_sum.max()) <= bound
        ):
            raise SecAggAbort(
                f"the unmasked sum of round {cfg.server_round} is out of range, so a mask did "
                "not cancel; a site returned a wrong pairwise seed"
            )
        return AggregateResult(
            mean_update=dequantize_mean(
                weighted_sum, total_weight, clip_range=cfg.clip_range, bits=cfg.bits
            ),
            total_weight=total_weight,
            weighted_sum=weighted_sum.copy(),
            survivors=self._survivors,
            dropped=self._dropped,
            responders=responders,
        )

    # --- inspection ----------------------------------------------------------------------

    def held_vectors(self) -> dict[str, NDArray[np.uint64]]:
        """Every vector the server holds: only the running sum, masked until finalized."""
        return {"masked_sum": self._masked_sum}

    @property
    def phase(self) -> str:
        """``upload``, ``consistency``, ``unmask-ready``, ``unmask``, ``done`` or ``aborted``."""
        return self._phase

    def _expect_phase(self, phase: str, action: str) -> None:
        if self._phase != phase:
            raise SecAggAbort(
                f"cannot {action} in the {self._phase!r} phase of round {self.config.server_round}"
            )


def _check_settings(*, threshold: int, clip_range: float, bits: int, dim: int) -> None:
    problems = []
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
        problems.append(
            f"`secagg.threshold` must resolve to a count >= 2 (got {threshold!r}); "
            "a single share would reveal a site's seed"
        )
    if not clip_range > 0:
        problems.append(f"`secagg.clip_range` must be > 0 (got {clip_range})")
    if not MIN_BITS <= bits <= MAX_BITS:
        problems.append(f"`secagg.bits` must be in [{MIN_BITS}, {MAX_BITS}] (got {bits})")
    if dim < 1:
        problems.append(f"the model must have at least one parameter (dim={dim})")
    if problems:
        raise ConfigError(
            "; ".join(problems) + "; set them in conf/secagg/*.yaml or on the command line"
        )
