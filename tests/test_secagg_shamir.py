"""Shamir secret sharing over GF(2**521 - 1): any t shares reconstruct, t - 1 do not."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedinfer.secagg.shamir import (
    PRIME,
    Share,
    interpolate_at_zero,
    lagrange_coefficients,
    reconstruct_secret,
    split_secret,
)


@st.composite
def sharings(draw: st.DrawFn) -> tuple[bytes, int, list[Share], st.DataObject]:
    n = draw(st.integers(min_value=2, max_value=12))
    threshold = draw(st.integers(min_value=2, max_value=n))
    secret = draw(st.binary(min_size=32, max_size=32))
    xs = draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n, unique=True))
    return secret, threshold, split_secret(secret, threshold=threshold, xs=xs), draw(st.data())


@settings(max_examples=60, deadline=None)
@given(sharings())
def test_any_threshold_shares_reconstruct(
    case: tuple[bytes, int, list[Share], st.DataObject],
) -> None:
    # Prepare
    secret, threshold, shares, data = case
    subset = data.draw(st.permutations(shares))[:threshold]
    # Execute
    recovered = reconstruct_secret(subset, length=32)
    # Assert
    assert recovered == secret


@settings(max_examples=60, deadline=None)
@given(sharings())
def test_fewer_than_threshold_shares_do_not_reconstruct(
    case: tuple[bytes, int, list[Share], st.DataObject],
) -> None:
    # Prepare
    secret, threshold, shares, data = case
    subset = data.draw(st.permutations(shares))[: threshold - 1]
    # Execute
    value = interpolate_at_zero(subset)
    # Assert
    assert value != int.from_bytes(secret, "big")


def test_too_few_shares_are_rejected_by_length_check() -> None:
    shares = split_secret(os.urandom(32), threshold=3, xs=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="expected length"):
        # Two shares of a degree-2 polynomial interpolate to a ~521-bit field element.
        reconstruct_secret(shares[:2], length=32)


def test_more_than_threshold_shares_also_reconstruct() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=3, xs=[1, 2, 3, 4, 5])
    assert reconstruct_secret(shares, length=32) == secret


def test_precomputed_coefficients_match() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=3, xs=[4, 7, 9])
    coefficients = lagrange_coefficients([4, 7, 9])
    assert reconstruct_secret(shares, length=32, coefficients=coefficients) == secret


def test_share_bytes_round_trip() -> None:
    share = split_secret(os.urandom(32), threshold=2, xs=[5, 6])[0]
    encoded = share.to_bytes()
    assert len(encoded) == 70
    assert Share.from_bytes(encoded) == share


@pytest.mark.parametrize(
    "raw",
    [bytes(69), bytes(4) + bytes(66), (1).to_bytes(4, "big") + PRIME.to_bytes(66, "big")],
    ids=["short", "x-zero", "y-not-reduced"],
)
def test_malformed_share_bytes_are_rejected(raw: bytes) -> None:
    with pytest.raises(ValueError):
        Share.from_bytes(raw)


@pytest.mark.parametrize(
    ("threshold", "xs", "message"),
    [(3, [1, 2], "threshold"), (2, [1, 1], "distinct"), (2, [0, 1], r"\[1, 2\*\*32\)")],
    ids=["threshold-above-n", "repeated-point", "point-zero"],
)
def test_split_validates_arguments(threshold: int, xs: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_secret(b"s", threshold=threshold, xs=xs)
