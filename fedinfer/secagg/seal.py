"""AEAD sealing of Shamir shares between two sites (ChaCha20-Poly1305).

The coordinator forwards every sealed share, so it must learn nothing from it and must
not be able to redirect it: the associated data binds the run, the round, the round
nonce, the sender and the receiver, and any change makes opening fail.

Examples
--------
>>> key = bytes(32)
>>> ad = share_associated_data(
...     run_id=1, server_round=2, round_nonce=bytes(16), sender=3, receiver=4
... )
>>> open_share(key, seal_share(key, b"share", associated_data=ad), associated_data=ad)
b'share'
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedinfer.errors import SecAggAbort
from fedinfer.secagg.keys import u64

__all__ = ["open_share", "seal_share", "share_associated_data"]

_NONCE_BYTES = 12
_TAG_BYTES = 16
_AD_LABEL = b"fedinfer/secagg/v1/share"


def share_associated_data(
    *, run_id: int, server_round: int, round_nonce: bytes, sender: int, receiver: int
) -> bytes:
    """Build the associated data that binds a sealed share to its round and direction."""
    return _AD_LABEL + u64(run_id) + u64(server_round) + round_nonce + u64(sender) + u64(receiver)


def seal_share(key: bytes, share: bytes, *, associated_data: bytes) -> bytes:
    """Encrypt and authenticate ``share``; returns ``nonce ‖ ciphertext ‖ tag``.

    A fresh random 96-bit nonce per message keeps nonces unique under one pair key.
    """
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, share, associated_data)


def open_share(key: bytes, sealed: bytes, *, associated_data: bytes) -> bytes:
    """Decrypt a sealed share, checking its tag against ``key`` and ``associated_data``.

    Raises
    ------
    SecAggAbort
        If the key or the associated data is wrong, or the ciphertext was altered.
    """
    if len(sealed) < _NONCE_BYTES + _TAG_BYTES:
        raise SecAggAbort("a sealed share is too short to be genuine")
    nonce, body = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, associated_data)
    except InvalidTag as exc:
        raise SecAggAbort(
            "a sealed share failed authentication: it was altered, or was sealed for another "
            "site, round or key"
        ) from exc
