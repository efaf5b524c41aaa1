"""The messages of the secure-aggregation protocol and their wire form.

Each message converts to a flat ``dict[str, WireValue]`` with :meth:`to_wire` and back with
:meth:`from_wire`. Values are ``int``, ``float``, ``bytes``, lists of ``int`` or ``bytes``,
and (only in :class:`MaskedUpload`) one uint64 ``numpy.ndarray``, so a Flower adapter can put
the array into an ``ArrayRecord`` and everything else into a ``ConfigRecord``; no pickle.
Site ids are unsigned 64-bit integers (Flower node ids). Mappings travel as two parallel
lists (``*_ids`` and the values), sorted by id.

::

    set-up      site -> server   SetupReply      site_id, enc_key, mask_key, sign_key,
                                                 identity_key, endorsement
    exchange 1  server -> site   RoundConfig     run_id, server_round, round_nonce, threshold,
                                                 clip_range, bits, dim, site_ids, enc_keys,
                                                 mask_keys, sign_keys, identity_keys,
                                                 endorsements
                site -> server   MaskedUpload    site_id, server_round, masked (ndarray uint64,
                                                 dim + 1), seed_commitment, share_recipients,
                                                 sealed_shares, signature
    only if a participant dropped before uploading (consistency check):
                server -> site   ConsistencyRequest  site_id, server_round, survivors
                site -> server   ConsistencyReply    site_id, server_round, signature
    exchange 2  server -> site   UnmaskRequest   site_id, server_round, survivors, dropped,
                                                 share_senders, sealed_shares, signers,
                                                 signatures
                site -> server   UnmaskReply     site_id, server_round, share_owners, seed_shares,
                                                 dropped_peers, pairwise_seeds

Malformed wire data raises :class:`~fedinfer.errors.SecAggAbort` naming the message and key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

from fedinfer.errors import SecAggAbort
import hashlib
import struct

from fedinfer.secagg.keys import KEY_BYTES, ROUND_NONCE_BYTES, SIGNATURE_BYTES, PublicKeys, u64
from fedinfer.secagg.quantize import MAX_BITS, MIN_BITS

__all__ = [
    "ConsistencyReply",
    "ConsistencyRequest",
    "MaskedUpload",
    "RoundConfig",
    "SetupReply",
    "UnmaskReply",
    "UnmaskRequest",
    "WireValue",
]

WireValue: TypeAlias = int | float | str | bytes | list[int] | list[bytes] | NDArray[Any]
"""A value on the wire: what Flower's ConfigRecord holds, or one numpy array."""

_U64_LIMIT = 1 << 64


# --- wire readers: every failure names the message and the key -------------------------


def _field(wire: Mapping[str, Any], message: str, key: str) -> Any:
    if key not in wire:
        raise SecAggAbort(f"malformed {message}: key {key!r} is missing")
    return wire[key]


def _int(wire: Mapping[str, Any], message: str, key: str) -> int:
    value = _field(wire, message, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecAggAbort(f"malformed {message}: key {key!r} must be an int")
    return value


def _site_id(wire: Mapping[str, Any], message: str, key: str) -> int:
    value = _int(wire, message, key)
    if not 0 <= value < _U64_LIMIT:
        raise SecAggAbort(f"malformed {message}: key {key!r} must be an unsigned 64-bit id")
    return value


def _bytes(wire: Mapping[str, Any], message: str, key: str, length: int | None = None) -> bytes:
    value = _field(wire, message, key)
    if not isinstance(value, bytes) or (length is not None and len(value) != length):
        size = "" if length is None else f" of length {length}"
        raise SecAggAbort(f"malformed {message}: key {key!r} must be bytes{size}")
    return value


def _ids(wire: Mapping[str, Any], message: str, key: str) -> tuple[int, ...]:
    value = _field(wire, message, key)
    if not isinstance(value, list | tuple) or any(
        isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _U64_LIMIT for v in value
    ):
        raise SecAggAbort(f"malformed {message}: key {key!r} must be a list of unsigned ids")
    if len(set(value)) != len(value):
        raise SecAggAbort(f"malformed {message}: key {key!r} lists a site twice")
    return tuple(value)


def _blobs(wire: Mapping[str, Any], message: str, key: str) -> tuple[bytes, ...]:
    value = _field(wire, message, key)
    if not isinstance(value, list | tuple) or any(not isinstance(v, bytes) for v in value):
        raise SecAggAbort(f"malformed {message}: key {key!r} must be a list of bytes")
    return tuple(value)


def _mapping(
    wire: Mapping[str, Any], message: str, ids_key: str, values_key: str
) -> dict[int, bytes]:
    ids, values = _ids(wire, message, ids_key), _blobs(wire, message, values_key)
    if len(ids) != len(values):
        raise SecAggAbort(f"malformed {message}: {ids_key!r} and {values_key!r} differ in length")
    return dict(zip(ids, values, strict=True))


def _sorted_lists(mapping: Mapping[int, bytes]) -> tuple[list[int], list[bytes]]:
    ids = sorted(mapping)
    return ids, [mapping[i] for i in ids]


# --- messages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SetupReply:
    """A site's answer to key set-up: its three public keys."""

    site_id: int
    public_keys: PublicKeys

    def to_wire(self) -> dict[str, WireValue]:
        """Return ``{"site_id", "enc_key", "mask_key", "sign_key"}``."""
        return {
            "site_id": self.site_id,
            "enc_key": self.public_keys.enc,
            "mask_key": self.public_keys.mask,
            "sign_key": self.public_keys.sign,
            "identity_key": self.public_keys.identity,
            "endorsement": self.public_keys.endorsement,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> SetupReply:
        """Parse :meth:`to_wire` output."""
        name = "SetupReply"
        keys = PublicKeys(
            enc=_bytes(wire, name, "enc_key", KEY_BYTES),
            mask=_bytes(wire, name, "mask_key", KEY_BYTES),
            sign=_bytes(wire, name, "sign_key", KEY_BYTES),
            identity=_bytes(wire, name, "identity_key"),
            endorsement=_bytes(wire, name, "endorsement"),
        )
        return cls(site_id=_site_id(wire, name, "site_id"), public_keys=keys)


@dataclass(frozen=True)
class RoundConfig:
    """What every participant of a round receives with the train message (exchange 1).

    Attributes
    ----------
    run_id, server_round : int
        Bound into every derived seed and every share's associated data.
    round_nonce : bytes
        16 random bytes drawn by the coordinator per round; keeps masks fresh even if a
        round number were ever repeated.
    threshold : int
        Shamir threshold ``t``: fewest survivors that can unmask, ``2 <= t <= n``.
    clip_range : float
        Updates are clipped to ``[-clip_range, clip_range]``.
    bits : int
        Quantization bits per coordinate.
    dim : int
        Length of the update vector (the upload has ``dim + 1`` coordinates).
    participants : dict of int to PublicKeys
        The round's participants and their public keys.
    """

    run_id: int
    server_round: int
    round_nonce: bytes
    threshold: int
    clip_range: float
    bits: int
    dim: int
    participants: dict[int, PublicKeys]

    @property
    def site_ids(self) -> tuple[int, ...]:
        """Participants in ascending id order (the order that signs pairwise masks)."""
        return tuple(sorted(self.participants))

    def share_point(self, site_id: int) -> int:
        """Shamir evaluation point of ``site_id``: its 1-based rank among the participants."""
        return self.site_ids.index(site_id) + 1

    def check(self) -> None:
        """Raise :class:`SecAggAbort` unless the round is one a site may safely join."""
        n = len(self.participants)
        problems = []
        if n < 2:
            problems.append(f"a round needs at least 2 participants (got {n})")
        if not 2 <= self.threshold <= n:
            problems.append(f"threshold must be in [2, {n}] (got {self.threshold})")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            problems.append(f"bits must be in [{MIN_BITS}, {MAX_BITS}] (got {self.bits})")
        if not self.clip_range > 0:
            problems.append(f"clip_range must be > 0 (got {self.clip_range})")
        if self.dim < 1:
            problems.append(f"dim must be >= 1 (got {self.dim})")
        if len(self.round_nonce) != ROUND_NONCE_BYTES:
            problems.append(f"round_nonce must be {ROUND_NONCE_BYTES} bytes")
        if self.server_round < 0 or self.run_id < 0:
            problems.append("run_id and server_round must be >= 0")
        keys = [k for pk in self.participants.values() for k in (pk.enc, pk.mask, pk.sign)]
        if len(set(keys)) != len(keys):
            problems.append("two participants announce the same public key")
        if problems:
            raise SecAggAbort("refusing the round: " + "; ".join(problems))

    def digest(self) -> bytes:
        """SHA-256 of every field, canonically encoded: what the survivors' signatures bind."""
        h = hashlib.sha256(b"fedinfer/secagg/v1/round-config")
        h.update(u64(self.run_id) + u64(self.server_round) + self.round_nonce)
        h.update(u64(self.threshold) + struct.pack(">d", self.clip_range))
        h.update(u64(self.bits) + u64(self.dim) + u64(len(self.participants)))
        for i in self.site_ids:
            keys = self.participants[i]
            h.update(u64(i) + keys.enc + keys.mask + keys.sign)
            h.update(u64(len(keys.identity)) + keys.identity + u64(len(keys.endorsement)))
            h.update(keys.endorsement)
        return h.digest()

    def to_wire(self) -> dict[str, WireValue]:
        """Return the flat wire dict (participants as ``site_ids`` and three key lists)."""
        ids = list(self.site_ids)
        return {
            "run_id": self.run_id,
            "server_round": self.server_round,
            "round_nonce": self.round_nonce,
            "threshold": self.threshold,
            "clip_range": float(self.clip_range),
            "bits": self.bits,
            "dim": self.dim,
            "site_ids": ids,
            "enc_keys": [self.participants[i].enc for i in ids],
            "mask_keys": [self.participants[i].mask for i in ids],
            "sign_keys": [self.participants[i].sign for i in ids],
            "identity_keys": [self.participants[i].identity for i in ids],
            "endorsements": [self.participants[i].endorsement for i in ids],
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> RoundConfig:
        """Parse :meth:`to_wire` output (does not run :meth:`check`)."""
        name = "RoundConfig"
        ids = _ids(wire, name, "site_ids")
        enc, mask = _blobs(wire, name, "enc_keys"), _blobs(wire, name, "mask_keys")
        sign = _blobs(wire, name, "sign_keys")
        identity = _blobs(wire, name, "identity_keys")
        endorsement = _blobs(wire, name, "endorsements")
        lengths = {len(x) for x in (enc, mask, sign, identity, endorsement)}
        if lengths != {len(ids)}:
            raise SecAggAbort(f"malformed {name}: site_ids and the key lists differ in length")
        clip_range = _field(wire, name, "clip_range")
        if isinstance(clip_range, bool) or not isinstance(clip_range, float | int):
            raise SecAggAbort(f"malformed {name}: key 'clip_range' must be a float")
        return cls(
            run_id=_site_id(wire, name, "run_id"),
            server_round=_site_id(wire, name, "server_round"),
            round_nonce=_bytes(wire, name, "round_nonce", ROUND_NONCE_BYTES),
            threshold=_int(wire, name, "threshold"),
            clip_range=float(clip_range),
            bits=_int(wire, name, "bits"),
            dim=_int(wire, name, "dim"),
            participants={
                i: PublicKeys(enc=e, mask=m, sign=g, identity=d, endorsement=a)
                for i, e, m, g, d, a in zip(
                    ids, enc, mask, sign, identity, endorsement, strict=True
                )
            },
        )


@dataclass(frozen=True)
class MaskedUpload:
    """A site's reply to exchange 1: its masked contribution and its sealed seed shares.

    Attributes
    ----------
    masked : numpy.ndarray
        uint64 vector of ``dim + 1`` coordinates: ``[w*q(update), w]`` plus masks, mod 2**64.
    seed_commitment : bytes
        SHA-256 commitment to the self-mask seed, so the coordinator can check a
        reconstruction without learning the seed.
    sealed_shares : dict of int to bytes
        Recipient id -> AEAD-sealed Shamir share of the self-mask seed (one per participant,
        the sender included).
    signature : bytes
        The site's Ed25519 signature of the round's configuration with every participant
        as survivor (:func:`~fedinfer.secagg.keys.survivor_statement`): what the other sites
        check before unmasking when nobody dropped, so that case needs no extra exchange.
    """

    site_id: int
    server_round: int
    masked: NDArray[np.uint64]
    seed_commitment: bytes
    sealed_shares: dict[int, bytes]
    signature: bytes

    def to_wire(self) -> dict[str, WireValue]:
        """Return the flat wire dict; ``masked`` stays a numpy array."""
        recipients, sealed = _sorted_lists(self.sealed_shares)
        return {
            "site_id": self.site_id,
            "server_round": self.server_round,
            "masked": self.masked,
            "seed_commitment": self.seed_commitment,
            "share_recipients": recipients,
            "sealed_shares": sealed,
            "signature": self.signature,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> MaskedUpload:
        """Parse :meth:`to_wire` output; ``masked`` must be a 1-D uint64 array."""
        name = "MaskedUpload"
        masked = _field(wire, name, "masked")
        if not isinstance(masked, np.ndarray) or masked.dtype != np.uint64 or masked.ndim != 1:
            raise SecAggAbort(f"malformed {name}: key 'masked' must be a 1-D uint64 array")
        return cls(
            site_id=_site_id(wire, name, "site_id"),
            server_round=_site_id(wire, name, "server_round"),
            masked=masked,
            seed_commitment=_bytes(wire, name, "seed_commitment", KEY_BYTES),
            sealed_shares=_mapping(wire, name, "share_recipients", "sealed_shares"),
            signature=_bytes(wire, name, "signature", SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class ConsistencyRequest:
    """Consistency check, coordinator -> one survivor: the survivor list to sign.

    Sent only when a participant dropped before uploading; when nobody dropped the
    signatures in the uploads already cover the full list.
    """

    site_id: int
    server_round: int
    survivors: tuple[int, ...]

    def to_wire(self) -> dict[str, WireValue]:
        """Return the flat wire dict."""
        return {
            "site_id": self.site_id,
            "server_round": self.server_round,
            "survivors": sorted(self.survivors),
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> ConsistencyRequest:
        """Parse :meth:`to_wire` output."""
        name = "ConsistencyRequest"
        return cls(
            site_id=_site_id(wire, name, "site_id"),
            server_round=_site_id(wire, name, "server_round"),
            survivors=_ids(wire, name, "survivors"),
        )


@dataclass(frozen=True)
class ConsistencyReply:
    """Consistency check, survivor -> coordinator: its signature of the list it was given."""

    site_id: int
    server_round: int
    signature: bytes

    def to_wire(self) -> dict[str, WireValue]:
        """Return the flat wire dict."""
        return {
            "site_id": self.site_id,
            "server_round": self.server_round,
            "signature": self.signature,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> ConsistencyReply:
        """Parse :meth:`to_wire` output."""
        name = "ConsistencyReply"
        return cls(
            site_id=_site_id(wire, name, "site_id"),
            server_round=_site_id(wire, name, "server_round"),
            signature=_bytes(wire, name, "signature", SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """Exchange 2, coordinator -> one survivor: who survived, who dropped, its sealed shares.

    Attributes
    ----------
    site_id : int
        The recipient.
    survivors, dropped : tuple of int
        Participants whose upload did / did not arrive (disjoint; together all participants).
    sealed_shares : dict of int to bytes
        Sender id (a survivor) -> the sealed share of that sender's seed addressed here.
    signatures : dict of int to bytes
        Signer id (a survivor) -> its signature of the round's configuration and exactly
        these survivors; the recipient checks them before it reveals anything.
    """

    site_id: int
    server_round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    sealed_shares: dict[int, bytes]
    signatures: dict[int, bytes]

    def to_wire(self) -> dict[str, WireValue]:
        """Return the flat wire dict."""
        senders, sealed = _sorted_lists(self.sealed_shares)
        signers, signatures = _sorted_lists(self.signatures)
        return {
            "site_id": self.site_id,
            "server_round": self.server_round,
            "survivors": sorted(self.survivors),
            "dropped": sorted(self.dropped),
            "share_senders": senders,
            "sealed_shares": sealed,
            "signers": signers,
            "signatures": signatures,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UnmaskRequest:
        """Parse :meth:`to_wire` output."""
        name = "UnmaskRequest"
        return cls(
            site_id=_site_id(wire, name, "site_id"),
            server_round=_site_id(wire, name, "server_round"),
            survivors=_ids(wire, name, "survivors"),
            dropped=_ids(wire, name, "dropped"),
            sealed_shares=_mapping(wire, name, "share_senders", "sealed_shares"),
            signatures=_mapping(wire, name, "signers", "signatures"),
        )


@dataclass(frozen=True)
class UnmaskReply:
    """Exchange 2, survivor -> coordinator: seed shares of survivors, seeds shared with the dropped.

    Attributes
    ----------
    seed_shares : dict of int to bytes
        Survivor id -> this site's Shamir share (70 bytes) of that survivor's self-mask seed.
    pairwise_seeds : dict of int to bytes
        Dropped id -> this round's 32-byte pairwise mask seed between this site and it.
    """

    site_id: int
    server_round: int
    seed_shares: dict[int, bytes]
    pairwise_seeds: dict[int, bytes]

    def to_wire(self) -> dict[str, WireValue]:
        """Return the flat wire dict."""
        owners, shares = _sorted_lists(self.seed_shares)
        peers, seeds = _sorted_lists(self.pairwise_seeds)
        return {
            "site_id": self.site_id,
            "server_round": self.server_round,
            "share_owners": owners,
            "seed_shares": shares,
            "dropped_peers": peers,
            "pairwise_seeds": seeds,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UnmaskReply:
        """Parse :meth:`to_wire` output."""
        name = "UnmaskReply"
        return cls(
            site_id=_site_id(wire, name, "site_id"),
            server_round=_site_id(wire, name, "server_round"),
            seed_shares=_mapping(wire, name, "share_owners", "seed_shares"),
            pairwise_seeds=_mapping(wire, name, "dropped_peers", "pairwise_seeds"),
        )
