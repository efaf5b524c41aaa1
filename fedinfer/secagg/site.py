"""The site side of secure aggregation: set-up, masking (exchange 1), unmasking (exchange 2).

A :class:`SiteSecAgg` holds the site's private keys for the run and, between the two
exchanges of a round, that round's :class:`RoundConfig`. All of it round-trips through
:meth:`SiteSecAgg.to_state` / :meth:`SiteSecAgg.from_state` as plain ints, bytes and lists,
so it can live in Flower's ``Context.state``.

What a site refuses (``SecAggAbort``), and why
-----------------------------------------------
- a round where its own public keys are not the ones listed (the coordinator substituted
  keys), where two participants share a key, or whose threshold is outside ``[2, n]``;
- a round number not above every round it already masked for (a replayed round could
  mask two different uploads under the same pairwise seeds);
- an unmask request that lists a site as both surviving and dropped, or sends it a share
  of a dropped site's seed: revealing that site's seed share *and* the pairwise seeds
  would let the coordinator unmask that site's upload alone;
- an unmask request with fewer survivors than the threshold, or that does not list it
  as a survivor; a second unmask request for the same round.

Threat model: an honest-but-curious coordinator, with the checks above against the
obvious active deviations. Each honest site reveals, per peer and round, either a share
of the peer's self-mask seed or the pairwise seed with it, never both, so no single
upload can be unmasked alone; but a coordinator that sends *different* survivor lists to
different sites may still learn the sum over a subset of the survivors instead of only
the full sum. Stopping that needs the consistency-check round of Bonawitz et al.
(CCS 2017), which this protocol omits to keep one extra exchange per round; a threshold
above n/2 (``secagg.threshold`` > 0.5) limits how such subsets can be formed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedinfer.errors import SecAggAbort
from fedinfer.secagg.keys import (
    KEY_BYTES,
    PublicKeys,
    SiteKeys,
    agree,
    derive_pairwise_seed,
    derive_share_key,
    seed_commitment,
)
from fedinfer.secagg.messages import (
    MaskedUpload,
    RoundConfig,
    SetupReply,
    UnmaskReply,
    UnmaskRequest,
    WireValue,
)
from fedinfer.secagg.prg import PAIRWISE_MASK, SELF_MASK, MaskExpander
from fedinfer.secagg.quantize import encode_contribution
from fedinfer.secagg.seal import open_share, seal_share, share_associated_data
from fedinfer.secagg.shamir import Share, split_secret

__all__ = ["SiteSecAgg"]

_PENDING = "pending."


class SiteSecAgg:
    """One site's secure-aggregation state and protocol steps.

    Parameters
    ----------
    site_id : int
        The site's id (its Flower node id), an unsigned 64-bit integer.
    keys : SiteKeys
        The site's private keys for the run.
    last_round : int, optional
        Highest round this site has masked an update for (default: -1, none).
    pending : RoundConfig or None, optional
        The round awaiting its unmask exchange (default: None).

    Examples
    --------
    >>> site = SiteSecAgg.create(site_id=7)
    >>> reply = site.setup_reply()                      # set-up, once per run
    >>> state = site.to_state()                         # -> Context.state
    >>> SiteSecAgg.from_state(state).site_id
    7
    """

    def __init__(
        self,
        *,
        site_id: int,
        keys: SiteKeys,
        last_round: int = -1,
        pending: RoundConfig | None = None,
    ) -> None:
        self.site_id = site_id
        self._keys = keys
        self.last_round = last_round
        self.pending = pending

    @classmethod
    def create(cls, site_id: int) -> SiteSecAgg:
        """Start a site with fresh key pairs."""
        return cls(site_id=site_id, keys=SiteKeys.generate())

    def setup_reply(self) -> SetupReply:
        """Return the set-up message: this site's two public keys."""
        return SetupReply(site_id=self.site_id, public_keys=self._keys.public_keys())

    def rekey(self) -> SetupReply:
        """Replace both key pairs (drops any pending round) and return the new set-up message.

        Not needed for security after a dropout: revealed pairwise seeds are per-round HKDF
        outputs and say nothing about the private keys or about other rounds.
        """
        self._keys = SiteKeys.generate()
        self.pending = None
        return self.setup_reply()

    # --- exchange 1 --------------------------------------------------------------------

    def mask_update(
        self, config: RoundConfig, update: NDArray[np.floating], *, weight: int
    ) -> MaskedUpload:
        """Quantize, weight and mask ``update``; seal shares of the fresh self-mask seed.

        Parameters
        ----------
        config : RoundConfig
            The round's configuration, as sent by the coordinator.
        update : numpy.ndarray
            Flat update vector (new minus global weights) of length ``config.dim``.
        weight : int
            The site's sample count; the coordinator learns only the sum over survivors.

        Returns
        -------
        MaskedUpload
            The reply to send; the round is remembered until :meth:`unmask`.

        Raises
        ------
        SecAggAbort
            If the round fails a check listed in the module docstring, or the update or
            weight cannot be encoded.
        """
        self._check_round(config)
        update = np.asarray(update)
        if update.shape != (config.dim,):
            raise SecAggAbort(
                f"the update has shape {update.shape}; the round expects ({config.dim},)"
            )
        masked = encode_contribution(
            update,
            weight=weight,
            clip_range=config.clip_range,
            bits=config.bits,
            num_sites=len(config.participants),
        )
        self_seed = os.urandom(KEY_BYTES)
        expander = MaskExpander(config.dim + 1)
        expander.add_into(masked, self_seed, purpose=SELF_MASK)
        for peer in config.site_ids:
            if peer != self.site_id:
                seed = self._pairwise_seed(config, peer)
                expander.add_into(masked, seed, purpose=PAIRWISE_MASK, subtract=peer < self.site_id)
        upload = MaskedUpload(
            site_id=self.site_id,
            server_round=config.server_round,
            masked=masked,
            seed_commitment=seed_commitment(
                self_seed,
                run_id=config.run_id,
                server_round=config.server_round,
                round_nonce=config.round_nonce,
                site_id=self.site_id,
            ),
            sealed_shares=self._seal_seed_shares(config, self_seed),
        )
        self.last_round, self.pending = config.server_round, config
        return upload

    def _check_round(self, config: RoundConfig) -> None:
        config.check()
        if config.participants.get(self.site_id) != self._keys.public_keys():
            raise SecAggAbort(
                f"refusing the round: site {self.site_id} is not listed with its own public keys"
            )
        if config.server_round <= self.last_round:
            raise SecAggAbort(
                f"refusing round {config.server_round}: this site already masked an update "
                f"for round {self.last_round}; rounds must increase"
            )

    def _pairwise_seed(self, config: RoundConfig, peer: int) -> bytes:
        shared = agree(self._keys.mask_private, config.participants[peer].mask)
        return derive_pairwise_seed(
            shared,
            run_id=config.run_id,
            server_round=config.server_round,
            round_nonce=config.round_nonce,
            site_a=self.site_id,
            site_b=peer,
        )

    def _share_key(self, config: RoundConfig, peer: int) -> bytes:
        shared = agree(self._keys.enc_private, config.participants[peer].enc)
        return derive_share_key(shared, run_id=config.run_id, site_a=self.site_id, site_b=peer)

    def _associated_data(self, config: RoundConfig, *, sender: int, receiver: int) -> bytes:
        return share_associated_data(
            run_id=config.run_id,
            server_round=config.server_round,
            round_nonce=config.round_nonce,
            sender=sender,
            receiver=receiver,
        )

    def _seal_seed_shares(self, config: RoundConfig, self_seed: bytes) -> dict[int, bytes]:
        ids = config.site_ids
        shares = split_secret(
            self_seed, threshold=config.threshold, xs=[config.share_point(i) for i in ids]
        )
        return {
            peer: seal_share(
                self._share_key(config, peer),
                share.to_bytes(),
                associated_data=self._associated_data(config, sender=self.site_id, receiver=peer),
            )
            for peer, share in zip(ids, shares, strict=True)
        }

    # --- exchange 2 --------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Open the survivors' seed shares and reveal the pairwise seeds shared with the dropped.

        Raises
        ------
        SecAggAbort
            If the request fails a check listed in the module docstring, or a sealed share
            does not authenticate. Nothing is revealed when it raises.
        """
        config = self._check_unmask(request)
        shares: dict[int, bytes] = {}
        for sender in request.survivors:
            plaintext = open_share(
                self._share_key(config, sender),
                request.sealed_shares[sender],
                associated_data=self._associated_data(config, sender=sender, receiver=self.site_id),
            )
            share = _parse_share(plaintext, sender)
            if share.x != config.share_point(self.site_id):
                raise SecAggAbort(f"the share from site {sender} was cut for another recipient")
            shares[sender] = plaintext
        seeds = {peer: self._pairwise_seed(config, peer) for peer in request.dropped}
        self.pending = None
        return UnmaskReply(
            site_id=self.site_id,
            server_round=config.server_round,
            seed_shares=shares,
            pairwise_seeds=seeds,
        )

    def _check_unmask(self, request: UnmaskRequest) -> RoundConfig:
        config = self.pending
        if config is None or config.server_round != request.server_round:
            raise SecAggAbort(
                f"refusing to unmask round {request.server_round}: this site has no masked "
                "upload of that round awaiting unmasking (or already answered)"
            )
        if request.site_id != self.site_id:
            raise SecAggAbort(
                f"an unmask request for site {request.site_id} reached site {self.site_id}"
            )
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = survivors & dropped | set(request.sealed_shares) & dropped
        if both:
            raise SecAggAbort(
                f"refusing to unmask: asked for a share of the self-mask seed of site(s) "
                f"{sorted(both)}, which are also listed as dropped"
            )
        if survivors | dropped != set(config.participants):
            raise SecAggAbort(
                "refusing to unmask: survivors and dropped do not partition the "
                "round's participants"
            )
        if self.site_id not in survivors:
            raise SecAggAbort("refusing to unmask: this site is not listed as a survivor")
        if len(survivors) < config.threshold:
            raise SecAggAbort(
                f"refusing to unmask: {len(survivors)} survivors is below the threshold "
                f"{config.threshold}"
            )
        if set(request.sealed_shares) != survivors:
            raise SecAggAbort("refusing to unmask: the request lacks a sealed share of a survivor")
        return config

    # --- state ---------------------------------------------------------------------------

    def to_state(self) -> dict[str, WireValue]:
        """Serialize to plain ints, bytes and lists (for Flower's ``Context.state``).

        Contains the private keys: keep it in the site's own state, never send it.
        """
        state: dict[str, WireValue] = {
            "site_id": self.site_id,
            "enc_private": self._keys.enc_private,
            "mask_private": self._keys.mask_private,
            "last_round": self.last_round,
        }
        if self.pending is not None:
            state.update({_PENDING + k: v for k, v in self.pending.to_wire().items()})
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SiteSecAgg:
        """Rebuild a site from :meth:`to_state` output."""
        pending_wire = {k[len(_PENDING) :]: v for k, v in state.items() if k.startswith(_PENDING)}
        return cls(
            site_id=int(state["site_id"]),
            keys=SiteKeys(enc_private=state["enc_private"], mask_private=state["mask_private"]),
            last_round=int(state["last_round"]),
            pending=RoundConfig.from_wire(pending_wire) if pending_wire else None,
        )

    @property
    def public_keys(self) -> PublicKeys:
        """The public keys this site announces."""
        return self._keys.public_keys()


def _parse_share(plaintext: bytes, sender: int) -> Share:
    try:
        return Share.from_bytes(plaintext)
    except ValueError as exc:
        raise SecAggAbort(f"the share from site {sender} is malformed: {exc}") from exc
