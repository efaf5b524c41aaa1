"""Secure-aggregation primitives: key agreement, HKDF derivations, share sealing, mask PRG."""

from __future__ import annotations

import numpy as np
import pytest

from fedinfer.errors import SecAggAbort
from fedinfer.secagg.keys import (
    SiteKeys,
    agree,
    derive_pairwise_seed,
    derive_share_key,
    seed_commitment,
)
from fedinfer.secagg.prg import PAIRWISE_MASK, SELF_MASK, MaskExpander, expand_mask
from fedinfer.secagg.seal import open_share, seal_share, share_associated_data

NONCE = bytes(range(16))

# df = 255: mean 255, sd 22.6. 255 + 10 sd: a uniform source exceeds it with probability < 1e-12.
CHI2_UNIFORM_BYTES_LIMIT = 481.0


def byte_chi2(vector: np.ndarray) -> float:
    counts = np.bincount(vector.view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_agreement_is_symmetric_and_key_specific() -> None:
    # Prepare
    alice, bob, eve = SiteKeys.generate(), SiteKeys.generate(), SiteKeys.generate()
    # Execute
    ab = agree(alice.mask_private, bob.public_keys().mask)
    ba = agree(bob.mask_private, alice.public_keys().mask)
    eb = agree(eve.mask_private, bob.public_keys().mask)
    # Assert
    assert ab == ba
    assert eb != ab


def test_small_order_public_key_is_refused() -> None:
    """An all-zero peer key forces an all-zero shared secret; agreement must refuse it."""
    with pytest.raises(SecAggAbort, match="key agreement failed"):
        agree(SiteKeys.generate().mask_private, bytes(32))


def test_private_keys_never_appear_in_repr() -> None:
    keys = SiteKeys.generate()
    assert keys.enc_private.hex() not in repr(keys)
    assert repr(keys) == "SiteKeys(<private>)"


def test_pairwise_seed_is_symmetric_and_fresh_per_round_nonce_and_run() -> None:
    # Prepare
    shared = agree(SiteKeys.generate().mask_private, SiteKeys.generate().public_keys().mask)

    def seed(
        *, run_id: int = 1, server_round: int = 1, nonce: bytes = NONCE, a: int = 3, b: int = 9
    ) -> bytes:
        return derive_pairwise_seed(
            shared, run_id=run_id, server_round=server_round, round_nonce=nonce, site_a=a, site_b=b
        )

    # Execute
    base = seed()
    # Assert
    assert seed(a=9, b=3) == base
    variants = [seed(server_round=2), seed(nonce=bytes(16)), seed(run_id=2), seed(b=10)]
    assert len({base, *variants}) == 5


def test_share_key_differs_from_mask_seed_of_same_secret() -> None:
    shared = bytes(range(32))
    key = derive_share_key(shared, run_id=1, site_a=1, site_b=2)
    mask_seed = derive_pairwise_seed(
        shared, run_id=1, server_round=0, round_nonce=NONCE, site_a=1, site_b=2
    )
    assert key != mask_seed
    assert key == derive_share_key(shared, run_id=1, site_a=2, site_b=1)


def test_seed_commitment_binds_seed_and_site() -> None:
    seed = bytes(range(32))
    commit = seed_commitment(seed, run_id=1, server_round=2, round_nonce=NONCE, site_id=3)
    assert commit != seed_commitment(
        bytes(32), run_id=1, server_round=2, round_nonce=NONCE, site_id=3
    )
    assert commit != seed_commitment(seed, run_id=1, server_round=2, round_nonce=NONCE, site_id=4)


# --- sealing: one positive case and its negative twins -----------------------------------


def _ad(*, sender: int = 1, receiver: int = 2, server_round: int = 5) -> bytes:
    return share_associated_data(
        run_id=7, server_round=server_round, round_nonce=NONCE, sender=sender, receiver=receiver
    )


def test_sealed_share_opens_with_right_key_and_context() -> None:
    key = bytes(range(32))
    sealed = seal_share(key, b"a share", associated_data=_ad())
    assert open_share(key, sealed, associated_data=_ad()) == b"a share"
    assert b"a share" not in sealed


def test_sealing_twice_gives_different_ciphertexts() -> None:
    key = bytes(range(32))
    assert seal_share(key, b"x", associated_data=_ad()) != seal_share(
        key, b"x", associated_data=_ad()
    )


def test_sealed_share_fails_with_wrong_key() -> None:
    sealed = seal_share(bytes(range(32)), b"a share", associated_data=_ad())
    with pytest.raises(SecAggAbort, match="failed authentication"):
        open_share(bytes(32), sealed, associated_data=_ad())


@pytest.mark.parametrize("position", [0, 12, 20, -1], ids=["nonce", "body", "body2", "tag"])
def test_tampered_sealed_share_fails(position: int) -> None:
    key = bytes(range(32))
    sealed = bytearray(seal_share(key, b"a share of seventy bytes" * 3, associated_data=_ad()))
    sealed[position] ^= 0x01
    with pytest.raises(SecAggAbort, match="failed authentication"):
        open_share(key, bytes(sealed), associated_data=_ad())


@pytest.mark.parametrize(
    "wrong_ad",
    [_ad(sender=2, receiver=1), _ad(receiver=3), _ad(server_round=6)],
    ids=["direction-swapped", "other-receiver", "other-round"],
)
def test_sealed_share_fails_with_wrong_associated_data(wrong_ad: bytes) -> None:
    key = bytes(range(32))
    sealed = seal_share(key, b"a share", associated_data=_ad())
    with pytest.raises(SecAggAbort, match="failed authentication"):
        open_share(key, sealed, associated_data=wrong_ad)


def test_truncated_sealed_share_fails() -> None:
    with pytest.raises(SecAggAbort, match="too short"):
        open_share(bytes(32), b"\x00" * 10, associated_data=_ad())


# --- mask PRG ---------------------------------------------------------------------------


def test_mask_is_deterministic_per_seed_and_purpose() -> None:
    seed = bytes(range(32))
    first = expand_mask(seed, 1000, purpose=SELF_MASK)
    np.testing.assert_array_equal(first, expand_mask(seed, 1000, purpose=SELF_MASK))
    assert first.dtype == np.uint64 and first.shape == (1000,)
    assert not np.any(first == expand_mask(seed, 1000, purpose=PAIRWISE_MASK))
    assert not np.any(first == expand_mask(bytes(32), 1000, purpose=SELF_MASK))


def test_mask_bytes_look_uniform() -> None:
    mask = expand_mask(bytes(range(32)), 4096, purpose=PAIRWISE_MASK)
    assert byte_chi2(mask) < CHI2_UNIFORM_BYTES_LIMIT


def test_adding_then_subtracting_a_mask_restores_the_vector() -> None:
    # Prepare
    expander = MaskExpander(513)
    original = np.arange(513, dtype=np.uint64)
    acc = original.copy()
    # Execute
    expander.add_into(acc, bytes(32), purpose=SELF_MASK)
    masked = acc.copy()
    expander.add_into(acc, bytes(32), purpose=SELF_MASK, subtract=True)
    # Assert
    assert not np.any(masked == original)
    np.testing.assert_array_equal(acc, original)


def test_mask_expander_rejects_wrong_accumulator() -> None:
    with pytest.raises(ValueError, match="uint64 vector of length 4"):
        MaskExpander(4).add_into(np.zeros(5, np.uint64), bytes(32), purpose=SELF_MASK)
