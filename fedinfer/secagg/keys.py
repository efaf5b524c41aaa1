"""Site key pairs, X25519 key agreement and the HKDF derivations of secure aggregation.

Every site holds two X25519 key pairs and one Ed25519 signing pair for the whole run:

- the *enc* pair, agreed pairwise into the AEAD key that encrypts Shamir shares
  (:func:`derive_share_key`);
- the *mask* pair, agreed pairwise into a fresh 32-byte mask seed per round
  (:func:`derive_pairwise_seed`). The HKDF ``info`` binds the run, the round number and
  the coordinator's random round nonce, so revealing one round's seed (after a peer
  dropped) says nothing about another round's seed or about the private key;
- the *sign* pair, which signs the survivor list a site commits to before any
  unmasking (:func:`survivor_statement`), so every site can check that all the others
  were given the same list (Bonawitz et al.'s consistency check).

Private keys travel as raw 32-byte strings, so they fit Flower's ``ConfigRecord``.

Examples
--------
>>> alice, bob = SiteKeys.generate(), SiteKeys.generate()
>>> s_ab = agree(alice.mask_private, bob.public_keys().mask)
>>> s_ab == agree(bob.mask_private, alice.public_keys().mask)
True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedinfer.errors import SecAggAbort

__all__ = [
    "KEY_BYTES",
    "ROUND_NONCE_BYTES",
    "SIGNATURE_BYTES",
    "PublicKeys",
    "SiteKeys",
    "agree",
    "derive_pairwise_seed",
    "derive_share_key",
    "endorsement_statement",
    "seed_commitment",
    "identity_public",
    "new_identity",
    "sign",
    "survivor_statement",
    "u64",
    "verify",
]

KEY_BYTES = 32
"""Length of X25519 public and private keys, and of every derived seed or key."""
ROUND_NONCE_BYTES = 16
"""Length of the coordinator's random per-round nonce."""
SIGNATURE_BYTES = 64
"""Length of an Ed25519 signature."""

_SALT = b"fedinfer/secagg/v1"
_INFO_SHARE_KEY = b"fedinfer/secagg/v1/share-key"
_INFO_PAIRWISE_SEED = b"fedinfer/secagg/v1/pairwise-mask-seed"
_COMMITMENT_LABEL = b"fedinfer/secagg/v1/self-seed-commitment"
_SURVIVORS_LABEL = b"fedinfer/secagg/v1/survivor-list"
_ENDORSEMENT_LABEL = b"fedinfer/secagg/v1/run-keys"


def u64(value: int) -> bytes:
    """Encode an unsigned 64-bit integer (site id, run id, round) as 8 big-endian bytes.

    Raises
    ------
    SecAggAbort
        If ``value`` is outside ``[0, 2**64)``.
    """
    if not 0 <= value < 1 << 64:
        raise SecAggAbort(f"{value} does not fit an unsigned 64-bit integer (site id, run, round)")
    return value.to_bytes(8, "big")


@dataclass(frozen=True)
class PublicKeys:
    """A site's two X25519 public keys, as raw 32-byte strings.

    Parameters
    ----------
    enc : bytes
        Public key agreed into the AEAD key that encrypts Shamir shares.
    mask : bytes
        Public key agreed into the per-round pairwise mask seeds.
    sign : bytes
        Ed25519 public key that verifies the site's signed survivor lists.
    identity : bytes, optional
        The site's long-lived Ed25519 identity key (pinned in its state directory), or
        ``b""`` when the site has none.
    endorsement : bytes, optional
        The identity key's signature of the three run keys (:func:`endorsement_statement`).
    """

    enc: bytes
    mask: bytes
    sign: bytes
    identity: bytes = b""
    endorsement: bytes = b""

    def __post_init__(self) -> None:
        for name, key in (("enc", self.enc), ("mask", self.mask), ("sign", self.sign)):
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise SecAggAbort(f"public key `{name}` must be {KEY_BYTES} raw bytes")
        if self.identity and len(self.identity) != KEY_BYTES:
            raise SecAggAbort(f"public key `identity` must be {KEY_BYTES} raw bytes")
        if bool(self.identity) != bool(self.endorsement):
            raise SecAggAbort("an identity key needs its endorsement, and the reverse")

    def endorsed(self, *, run_id: int, site_id: int) -> bool:
        """Whether the identity key signed these run keys for ``site_id`` in ``run_id``."""
        return bool(self.identity) and verify(
            self.identity, self.endorsement, endorsement_statement(run_id, site_id, self)
        )


@dataclass(frozen=True, repr=False)
class SiteKeys:
    """A site's private keys (two X25519, one Ed25519), as raw 32-byte strings (never logged).

    Parameters
    ----------
    enc_private : bytes
        Private half of the share-encryption pair.
    mask_private : bytes
        Private half of the pairwise-mask pair.
    sign_private : bytes
        Private half of the Ed25519 pair that signs survivor lists.
    """

    enc_private: bytes
    mask_private: bytes
    sign_private: bytes

    def __post_init__(self) -> None:
        for name, key in (
            ("enc_private", self.enc_private),
            ("mask_private", self.mask_private),
            ("sign_private", self.sign_private),
        ):
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise SecAggAbort(f"private key `{name}` must be {KEY_BYTES} raw bytes")

    def __repr__(self) -> str:
        return "SiteKeys(<private>)"

    @classmethod
    def generate(cls) -> SiteKeys:
        """Draw fresh key pairs from the operating system's CSPRNG."""
        return cls(
            enc_private=X25519PrivateKey.generate().private_bytes_raw(),
            mask_private=X25519PrivateKey.generate().private_bytes_raw(),
            sign_private=Ed25519PrivateKey.generate().private_bytes_raw(),
        )

    def public_keys(self) -> PublicKeys:
        """Return the public keys that the site announces at set-up."""
        return PublicKeys(
            enc=_public_of(self.enc_private),
            mask=_public_of(self.mask_private),
            sign=Ed25519PrivateKey.from_private_bytes(self.sign_private)
            .public_key()
            .public_bytes_raw(),
        )


def _public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes) -> bytes:
    """X25519 key agreement: the raw 32-byte shared secret of ``private`` and ``peer_public``.

    Raises
    ------
    SecAggAbort
        If the peer key is malformed or of small order (an all-zero shared secret).
    """
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        return X25519PrivateKey.from_private_bytes(private).exchange(peer)
    except ValueError as exc:
        raise SecAggAbort(f"X25519 key agreement failed with a peer public key: {exc}") from exc


def _hkdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_SALT, info=info).derive(shared)


def _pair(site_a: int, site_b: int) -> bytes:
    low, high = sorted((site_a, site_b))
    return u64(low) + u64(high)


def derive_share_key(shared: bytes, *, run_id: int, site_a: int, site_b: int) -> bytes:
    """Derive the pair's 32-byte AEAD key for Shamir shares (the same for both directions).

    The direction and the round are bound by the AEAD's associated data instead.
    """
    return _hkdf(shared, _INFO_SHARE_KEY + u64(run_id) + _pair(site_a, site_b))


def derive_pairwise_seed(
    shared: bytes,
    *,
    run_id: int,
    server_round: int,
    round_nonce: bytes,
    site_a: int,
    site_b: int,
) -> bytes:
    """Derive the pair's 32-byte mask seed ``s_ab`` for one round (symmetric in a and b).

    Raises
    ------
    SecAggAbort
        If ``round_nonce`` is not :data:`ROUND_NONCE_BYTES` long.
    """
    if len(round_nonce) != ROUND_NONCE_BYTES:
        raise SecAggAbort(f"the round nonce must be {ROUND_NONCE_BYTES} bytes")
    info = _INFO_PAIRWISE_SEED + u64(run_id) + u64(server_round) + round_nonce
    return _hkdf(shared, info + _pair(site_a, site_b))


def seed_commitment(
    seed: bytes, *, run_id: int, server_round: int, round_nonce: bytes, site_id: int
) -> bytes:
    """SHA-256 commitment to a site's 32-byte self-mask seed for one round.

    The seed is 256 uniformly random bits, so the hash hides it; the coordinator uses the
    commitment to check that the seed it reconstructed from shares is the one that was used.
    """
    context = u64(run_id) + u64(server_round) + round_nonce + u64(site_id)
    return hashlib.sha256(_COMMITMENT_LABEL + context + seed).digest()


def survivor_statement(config_digest: bytes, survivors: list[int] | tuple[int, ...]) -> bytes:
    """The bytes a site signs to commit to one round's configuration and survivor list."""
    return _SURVIVORS_LABEL + config_digest + b"".join(u64(i) for i in sorted(survivors))


def sign(private: bytes, message: bytes) -> bytes:
    """Ed25519 signature of ``message`` with the raw 32-byte private key ``private``."""
    return Ed25519PrivateKey.from_private_bytes(private).sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``public``."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def endorsement_statement(run_id: int, site_id: int, keys: PublicKeys) -> bytes:
    """The bytes a site's identity key signs to vouch for its run keys."""
    return _ENDORSEMENT_LABEL + u64(run_id) + u64(site_id) + keys.enc + keys.mask + keys.sign


def identity_public(private: bytes) -> bytes:
    """The raw Ed25519 public key of the raw private key ``private``."""
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def new_identity() -> bytes:
    """A fresh raw Ed25519 private key from the operating system's CSPRNG."""
    return Ed25519PrivateKey.generate().private_bytes_raw()
