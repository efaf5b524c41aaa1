"""Shamir secret sharing over the prime field GF(2**521 - 1).

A secret of up to 64 bytes is read as an integer ``s < 2**512 < p`` and hidden as the
constant term of a random polynomial ``f`` of degree ``threshold - 1``; share ``k`` is
``(x_k, f(x_k))``. Any ``threshold`` shares determine ``f`` and so ``s`` (Lagrange
interpolation at 0); any ``threshold - 1`` shares are consistent with every secret, with
the same probability, so they reveal nothing. ``p = 2**521 - 1`` is a Mersenne prime, so
a 32-byte mask seed fits one field element without splitting.

Coefficients come from :mod:`secrets`, the operating system's CSPRNG.

Examples
--------
>>> shares = split_secret(b"seed" * 8, threshold=2, xs=[1, 2, 3])
>>> reconstruct_secret(shares[1:], length=32) == b"seed" * 8
True
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "PRIME",
    "Share",
    "interpolate_at_zero",
    "lagrange_coefficients",
    "reconstruct_secret",
    "split_secret",
]

PRIME: Final = (1 << 521) - 1
"""The field modulus, the Mersenne prime 2**521 - 1."""
_Y_BYTES: Final = 66  # ceil(521 / 8)
_X_BYTES: Final = 4
_MAX_SECRET_BYTES: Final = 64


@dataclass(frozen=True)
class Share:
    """One point ``(x, y)`` of the sharing polynomial; ``x`` is never 0."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """Encode as 4 bytes of ``x`` then 66 bytes of ``y``, big-endian (70 bytes)."""
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Decode :meth:`to_bytes`; raises ``ValueError`` on a malformed share."""
        if len(data) != _X_BYTES + _Y_BYTES:
            raise ValueError(f"a share is {_X_BYTES + _Y_BYTES} bytes (got {len(data)})")
        x = int.from_bytes(data[:_X_BYTES], "big")
        y = int.from_bytes(data[_X_BYTES:], "big")
        if x == 0 or y >= PRIME:
            raise ValueError("a share must have x != 0 and y < p")
        return cls(x=x, y=y)


def split_secret(secret: bytes, *, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Split ``secret`` into one share per evaluation point in ``xs``.

    Parameters
    ----------
    secret : bytes
        At most 64 bytes.
    threshold : int
        How many shares reconstruct the secret (``1 <= threshold <= len(xs)``).
    xs : sequence of int
        Distinct evaluation points in ``[1, 2**32)``, one per share holder.

    Returns
    -------
    list of Share
        ``shares[k]`` is the point at ``xs[k]``.
    """
    if len(secret) > _MAX_SECRET_BYTES:
        raise ValueError(f"a secret is at most {_MAX_SECRET_BYTES} bytes (got {len(secret)})")
    _check_points(xs)
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}] (got {threshold})")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x=x, y=_evaluate(coefficients, x)) for x in xs]


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):  # Horner
        value = (value * x + coefficient) % PRIME
    return value


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError("share points must be distinct")
    if any(not 1 <= x < 1 << (8 * _X_BYTES) for x in xs):
        raise ValueError("share points must lie in [1, 2**32)")


def lagrange_coefficients(xs: Sequence[int]) -> list[int]:
    """Return ``l_k(0)`` for each point, so that ``f(0) = sum(l_k(0) * y_k) mod p``.

    The coefficients depend only on the points, so a caller that reconstructs many
    secrets from the same share holders computes them once.
    """
    _check_points(xs)
    coefficients = []
    for k, x_k in enumerate(xs):
        numerator, denominator = 1, 1
        for m, x_m in enumerate(xs):
            if m != k:
                numerator = numerator * x_m % PRIME
                denominator = denominator * (x_m - x_k) % PRIME
        coefficients.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return coefficients


def interpolate_at_zero(shares: Sequence[Share], coefficients: Sequence[int] | None = None) -> int:
    """Interpolate the polynomial through ``shares`` at 0 (the secret, given enough shares).

    With fewer than ``threshold`` shares the result is an unrelated field element.
    ``coefficients`` may pass precomputed :func:`lagrange_coefficients` of the same points.
    """
    if not shares:
        raise ValueError("interpolation needs at least one share")
    if coefficients is None:
        coefficients = lagrange_coefficients([share.x for share in shares])
    return sum(c * share.y for c, share in zip(coefficients, shares, strict=True)) % PRIME


def reconstruct_secret(
    shares: Sequence[Share], *, length: int, coefficients: Sequence[int] | None = None
) -> bytes:
    """Reconstruct a ``length``-byte secret from at least ``threshold`` shares.

    Raises
    ------
    ValueError
        If the interpolated value does not fit ``length`` bytes, which is what almost
        always happens with too few or corrupted shares.
    """
    value = interpolate_at_zero(shares, coefficients)
    if value >= 1 << (8 * length):
        raise ValueError("the shares do not reconstruct a secret of the expected length")
    return value.to_bytes(length, "big")
