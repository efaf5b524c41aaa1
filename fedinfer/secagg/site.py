"""The site side of secure aggregation: set-up, masking (exchange 1), consistency, unmasking.

A :class:`SiteSecAgg` holds the site's private keys for the run, the highest round it has
masked, and, between the exchanges of a round, that round's :class:`RoundConfig` and the
survivor list it signed. All of it round-trips through :meth:`SiteSecAgg.to_state` /
:meth:`SiteSecAgg.from_state` as plain ints, bytes and lists; the Flower adapter keeps it in
the site's state directory (:mod:`fedinfer.secagg.store`), never only in Flower's Context,
so the replay guard survives a restart of the site or of the run.

What a site refuses (``SecAggAbort``), and why
-----------------------------------------------
- a round where its own public keys are not the ones listed (the coordinator substituted
  keys), where two participants share a key, of another run than the keys were set up
  for, with fewer than ``min_participants`` participants, or whose threshold is below
  ``min_threshold_fraction`` of the participants or not above half of them
  (:func:`threshold_floor`: two disjoint groups of survivors can then never both reach
  the threshold);
- a round number not above every round it already masked for (a replayed or resumed
  round would let the coordinator subtract two sums over survivor sets that differ by
  one site), except the round it masked last if it has not yet signed a survivor list
  or revealed anything for it (:meth:`SiteSecAgg._may_remask`: the earlier upload can
  then never be unmasked with this site's help, which a threshold above half the
  participants turns into "never unmasked at all" for the one survivor set in question);
- an unmask request whose survivor list is not signed, together with the round's
  configuration, by at least ``threshold`` survivors, this site included (Bonawitz et
  al.'s consistency check): a site commits to one survivor list per round, either the
  full list it signs with its upload or the list of a :class:`ConsistencyRequest`, so
  per-site survivor lists ("split view") are refused before anything is revealed;
- an unmask request that lists a site as both surviving and dropped, or sends it a share
  of a dropped site's seed: revealing that site's seed share *and* the pairwise seeds
  would let the coordinator unmask that site's upload alone;
- an unmask request with fewer survivors than the threshold, or that does not list it
  as a survivor; a second unmask request for the same round.

Threat model: an active coordinator that does not control sites' keys. Each honest site
reveals, per peer and round, either a share of the peer's self-mask seed or the pairwise
seed with it, never both; every revealing site has checked that at least ``threshold``
survivors committed to the same configuration and survivor list, and a threshold above
half the participants leaves room for only one such group per round. The coordinator
then learns the sum over that one survivor list and nothing else. When nobody dropped,
the signatures travel with the uploads and the check costs no extra exchange; after a
dropout it costs one (:meth:`SiteSecAgg.sign_survivors`). Run keys are endorsed by the
site's long-lived identity key (``identity``), and ``require_endorsed`` refuses peers
without an endorsement. A coordinator that invents participants (Sybil sites) with
identity keys of its own holds their shares and pairwise seeds, so a round of one real
site and ``threshold`` Sybils unmasks that site's update: ``trusted_identities`` (the site
policy's ``secagg_trusted_peers``) lists the real peers' identity keys, and a round with a
participant not endorsed by one of them, or two participants showing the same one, is
refused (:func:`untrusted_participants`). Not covered: a site without that list; or a
coordinator that starts a *new* run to have the same data masked again.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Collection, Mapping
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
    endorsement_statement,
    identity_public,
    seed_commitment,
    sign,
    survivor_statement,
    verify,
)
from fedinfer.secagg.messages import (
    ConsistencyReply,
    ConsistencyRequest,
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

__all__ = ["SiteSecAgg", "threshold_floor", "untrusted_participants"]

_PENDING = "pending."
DEFAULT_MIN_THRESHOLD_FRACTION = 0.5
"""A site refuses a threshold below this fraction of the participants (and never accepts
one at or below half of them, whatever the fraction)."""
DEFAULT_MIN_PARTICIPANTS = 3
"""A site refuses a round with fewer participants (two sites could subtract their own)."""


def threshold_floor(min_fraction: float, *, participants: int) -> int:
    """The fewest Shamir shares a site accepts for a round of ``participants`` sites.

    At least ``min_fraction`` of the participants, strictly more than half of them (two
    disjoint groups of survivors could otherwise each reach the threshold, and the
    consistency check rests on there being one), and at least 2. The site policy's check
    (:func:`fedinfer.policy.secagg_threshold_floor`) is this same rule.

    Examples
    --------
    >>> threshold_floor(0.5, participants=4), threshold_floor(0.75, participants=4)
    (3, 3)
    >>> threshold_floor(0.75, participants=5), threshold_floor(0.0, participants=2)
    (4, 2)
    """
    return max(2, participants // 2 + 1, math.ceil(min_fraction * participants - 1e-9))


def untrusted_participants(
    config: RoundConfig, trusted: Collection[bytes], *, site_id: int
) -> list[int]:
    """The participants, other than ``site_id``, that a site knowing its peers must refuse.

    A participant passes when its run keys carry a valid endorsement, for this run and its
    site id, by an identity key in ``trusted`` that no other participant also presents: a
    coordinator can then add no participant of its own making (a Sybil), and a peer
    colluding with it can vouch for one participant only.

    Examples
    --------
    >>> from fedinfer.secagg.keys import new_identity
    >>> a, b = (SiteSecAgg.create(i, run_id=1, identity=new_identity()) for i in (1, 2))
    >>> config = RoundConfig(run_id=1, server_round=1, round_nonce=bytes(16), threshold=2,
    ...     clip_range=1.0, bits=16, dim=1, participants={1: a.public_keys, 2: b.public_keys})
    >>> untrusted_participants(config, {a.public_keys.identity}, site_id=1)
    [2]
    """
    uses = Counter(keys.identity for keys in config.participants.values())
    return [
        i
        for i, keys in sorted(config.participants.items())
        if i != site_id
        and (
            keys.identity not in trusted
            or uses[keys.identity] > 1
            or not keys.endorsed(run_id=config.run_id, site_id=i)
        )
    ]


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
    committed : tuple of int or None, optional
        The survivor list this site signed for the pending round (default: None).
    run_id : int or None, optional
        The run the keys were set up for; rounds of another run are refused (default:
        None, any run).
    min_threshold_fraction : float, optional
        Site-side floor: the threshold must be at least this fraction of the participants
        and never at or below half of them (:func:`threshold_floor`; default
        :data:`DEFAULT_MIN_THRESHOLD_FRACTION`). Not part of the state: the site policy
        supplies it at every load.
    min_participants : int, optional
        Site-side floor on a round's participants (default :data:`DEFAULT_MIN_PARTICIPANTS`).
    identity : bytes or None, optional
        The site's long-lived Ed25519 identity key (raw private bytes), pinned in its state
        directory; with a ``run_id`` it endorses the run keys (default: None).
    require_endorsed : bool, optional
        Refuse a round unless every participant's run keys carry a valid endorsement by an
        identity key (default: False).
    trusted_identities : collection of bytes or None, optional
        If given, every participant's identity key must be one of these (default: None).

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
        committed: tuple[int, ...] | None = None,
        run_id: int | None = None,
        min_threshold_fraction: float = DEFAULT_MIN_THRESHOLD_FRACTION,
        min_participants: int = DEFAULT_MIN_PARTICIPANTS,
        identity: bytes | None = None,
        require_endorsed: bool = False,
        trusted_identities: Collection[bytes] | None = None,
    ) -> None:
        self.site_id = site_id
        self._keys = keys
        self.last_round = last_round
        self.pending = pending
        self.committed = committed
        self.run_id = run_id
        self.min_threshold_fraction = float(min_threshold_fraction)
        self.min_participants = int(min_participants)
        self._identity = identity
        self.require_endorsed = require_endorsed
        self.trusted_identities = (
            None if trusted_identities is None else frozenset(trusted_identities)
        )

    @classmethod
    def create(cls, site_id: int, *, run_id: int | None = None, **floor: Any) -> SiteSecAgg:
        """Start a site with fresh key pairs (``floor``: the two site-side minimums)."""
        return cls(site_id=site_id, keys=SiteKeys.generate(), run_id=run_id, **floor)

    def setup_reply(self) -> SetupReply:
        """Return the set-up message: this site's three public keys."""
        return SetupReply(site_id=self.site_id, public_keys=self.public_keys)

    def rekey(self) -> SetupReply:
        """Replace the key pairs (drops any pending round) and return the new set-up message.

        Not needed for security after a dropout: revealed pairwise seeds are per-round HKDF
        outputs and say nothing about the private keys or about other rounds.
        """
        self._keys = SiteKeys.generate()
        self.pending, self.committed = None, None
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
        self.check_round(config)
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
            signature=sign(
                self._keys.sign_private, survivor_statement(config.digest(), config.site_ids)
            ),
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
        self.last_round, self.pending, self.committed = config.server_round, config, None
        return upload

    def check_round(self, config: RoundConfig) -> None:
        """Raise :class:`SecAggAbort` unless this site may mask for ``config`` (see above).

        Cheap: a site calls it before it trains, so a refused round costs no training.
        """
        config.check()
        if config.participants.get(self.site_id) != self.public_keys:
            raise SecAggAbort(
                f"refusing the round: site {self.site_id} is not listed with its own public keys"
            )
        if self.require_endorsed:
            unendorsed = [
                i
                for i, keys in sorted(config.participants.items())
                if not keys.endorsed(run_id=config.run_id, site_id=i)
            ]
            if unendorsed:
                raise SecAggAbort(
                    f"refusing the round: the run keys of site(s) {unendorsed} are not endorsed "
                    "by an identity key"
                )
        if self.trusted_identities is not None:
            strangers = untrusted_participants(
                config, self.trusted_identities, site_id=self.site_id
            )
            if strangers:
                raise SecAggAbort(
                    f"refusing the round: site(s) {strangers} have an identity key this site "
                    "does not trust (or share one, or lack its endorsement)"
                )
        if self.run_id is not None and config.run_id != self.run_id:
            raise SecAggAbort(
                f"refusing the round: it is of run {config.run_id}, but this site's keys were "
                f"set up for run {self.run_id}"
            )
        n = len(config.participants)
        if n < self.min_participants:
            raise SecAggAbort(
                f"refusing the round: {n} participants is below this site's minimum "
                f"{self.min_participants} (site setting `min_participants`)"
            )
        floor = threshold_floor(self.min_threshold_fraction, participants=n)
        if config.threshold < floor:
            raise SecAggAbort(
                f"refusing the round: threshold {config.threshold} of {n} participants is below "
                f"this site's floor {floor} (at least {self.min_threshold_fraction:g} of them "
                "and more than half; site setting `min_threshold_fraction`); raise "
                "`secagg.threshold`"
            )
        if config.server_round <= self.last_round and not self._may_remask(config):
            raise SecAggAbort(
                f"refusing round {config.server_round}: this site already masked an update "
                f"for round {self.last_round}; rounds must increase"
            )

    def _may_remask(self, config: RoundConfig) -> bool:
        """Whether ``config`` re-asks the pending round, for which this site revealed nothing.

        Masking it again discards the pending configuration, so this site will never help
        unmask the earlier upload; any ``threshold`` sites that do unmask it cannot also
        mask the re-asked round, and two such groups cannot coexist when the threshold is
        above half the participants. So the coordinator still learns one sum per round.
        A coordinator resumed after a crash mid-round relies on this.
        """
        return (
            self.pending is not None
            and self.committed is None
            and config.server_round == self.last_round == self.pending.server_round
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

    # --- consistency check (only after a dropout) ----------------------------------------

    def sign_survivors(self, request: ConsistencyRequest) -> ConsistencyReply:
        """Commit to the survivor list of the pending round: sign it with the configuration.

        A site signs at most one such list per round and will afterwards unmask only for it.

        Raises
        ------
        SecAggAbort
            If no round awaits unmasking, the site already committed, or the list is not a
            subset of the participants with this site in it and at least ``threshold`` sites.
        """
        config = self.pending
        if config is None or config.server_round != request.server_round:
            raise SecAggAbort(
                f"refusing to sign survivors of round {request.server_round}: this site has no "
                "masked upload of that round awaiting unmasking (or already answered)"
            )
        if request.site_id != self.site_id:
            raise SecAggAbort(
                f"a consistency request for site {request.site_id} reached site {self.site_id}"
            )
        if self.committed is not None:
            raise SecAggAbort(
                f"refusing to sign a second survivor list for round {config.server_round}"
            )
        survivors = tuple(sorted(request.survivors))
        self._check_survivor_list(config, survivors)
        self.committed = survivors
        return ConsistencyReply(
            site_id=self.site_id,
            server_round=config.server_round,
            signature=sign(self._keys.sign_private, survivor_statement(config.digest(), survivors)),
        )

    def _check_survivor_list(self, config: RoundConfig, survivors: tuple[int, ...]) -> None:
        if not set(survivors) <= set(config.participants):
            raise SecAggAbort("refusing the survivor list: it names a site outside the round")
        if self.site_id not in survivors:
            raise SecAggAbort("refusing to unmask: this site is not listed as a survivor")
        if len(survivors) < config.threshold:
            raise SecAggAbort(
                f"refusing to unmask: {len(survivors)} survivors is below the threshold "
                f"{config.threshold}"
            )

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
        self.pending, self.committed = None, None
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
        self._check_survivor_list(config, tuple(sorted(survivors)))
        if set(request.sealed_shares) != survivors:
            raise SecAggAbort("refusing to unmask: the request lacks a sealed share of a survivor")
        self._check_consistency(config, tuple(sorted(survivors)), request.signatures)
        return config

    def _check_consistency(
        self, config: RoundConfig, survivors: tuple[int, ...], signatures: Mapping[int, bytes]
    ) -> None:
        """Bonawitz's consistency check: ``threshold`` survivors signed this very list."""
        mine = self.committed if self.committed is not None else config.site_ids
        if survivors != mine:
            raise SecAggAbort(
                f"refusing to unmask: the survivor list {list(survivors)} is not the one this "
                f"site committed to ({list(mine)}); the coordinator sent different lists"
            )
        if not set(signatures) <= set(survivors) or self.site_id not in signatures:
            raise SecAggAbort(
                "refusing to unmask: the signatures are not all from survivors, or lack this "
                "site's own"
            )
        statement = survivor_statement(config.digest(), survivors)
        bad = [
            signer
            for signer, signature in sorted(signatures.items())
            if not verify(config.participants[signer].sign, signature, statement)
        ]
        if bad:
            raise SecAggAbort(
                f"refusing to unmask: site(s) {bad} did not sign this round's configuration "
                "and survivor list (split view: the sites were shown different lists)"
            )
        if len(signatures) < config.threshold:
            raise SecAggAbort(
                f"refusing to unmask: only {len(signatures)} survivors signed the survivor "
                f"list; the threshold is {config.threshold}"
            )

    # --- state ---------------------------------------------------------------------------

    def to_state(self) -> dict[str, WireValue]:
        """Serialize to plain ints, bytes and lists (for Flower's ``Context.state``).

        Contains the private keys: keep it in the site's own state, never send it.
        """
        state: dict[str, WireValue] = {
            "site_id": self.site_id,
            "enc_private": self._keys.enc_private,
            "mask_private": self._keys.mask_private,
            "sign_private": self._keys.sign_private,
            "last_round": self.last_round,
        }
        if self.run_id is not None:
            state["run_id"] = self.run_id
        if self.committed is not None:
            state["committed"] = list(self.committed)
        if self.pending is not None:
            state.update({_PENDING + k: v for k, v in self.pending.to_wire().items()})
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any], **floor: Any) -> SiteSecAgg:
        """Rebuild a site from :meth:`to_state` output (``floor``: the site-side minimums)."""
        pending_wire = {k[len(_PENDING) :]: v for k, v in state.items() if k.startswith(_PENDING)}
        committed = state.get("committed")
        run_id = state.get("run_id")
        return cls(
            site_id=int(state["site_id"]),
            keys=SiteKeys(
                enc_private=state["enc_private"],
                mask_private=state["mask_private"],
                sign_private=state["sign_private"],
            ),
            last_round=int(state["last_round"]),
            pending=RoundConfig.from_wire(pending_wire) if pending_wire else None,
            committed=None if committed is None else tuple(int(i) for i in committed),
            run_id=None if run_id is None else int(run_id),
            **floor,
        )

    @property
    def public_keys(self) -> PublicKeys:
        """The public keys this site announces (endorsed by its identity key if it has one)."""
        keys = self._keys.public_keys()
        if self._identity is None or self.run_id is None:
            return keys
        return PublicKeys(
            enc=keys.enc,
            mask=keys.mask,
            sign=keys.sign,
            identity=identity_public(self._identity),
            endorsement=sign(
                self._identity, endorsement_statement(self.run_id, self.site_id, keys)
            ),
        )


def _parse_share(plaintext: bytes, sender: int) -> Share:
    try:
        return Share.from_bytes(plaintext)
    except ValueError as exc:
        raise SecAggAbort(f"the share from site {sender} is malformed: {exc}") from exc
