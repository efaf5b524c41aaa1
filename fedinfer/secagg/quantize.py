"""Fixed-point encoding of weighted model updates for masking modulo 2**64.

Encoding (per site ``i`` with update ``u_i``, integer weight ``w_i`` = its sample count)::

    H    = 2**(bits - 1) - 1                       # largest quantization level
    q_i  = rint(clip(u_i, -c, c) * H / c)          # int64 in [-H, H]; 0.0 maps to 0 exactly
    v_i  = [w_i * q_1, ..., w_i * q_d, w_i]        # int64, read as uint64 (two's complement)

The coordinator recovers ``S = sum_i w_i q_i`` and ``W = sum_i w_i`` exactly (the masks cancel
modulo 2**64, and the sum cannot wrap because every site checks ``n * w_i * H < 2**63``) and
returns the weighted mean update ``S / W * c / H``.

Quantization error bound (documented contract, see :func:`quantization_bound`)
------------------------------------------------------------------------------
Let ``m = sum_i w_i clip(u_i) / W`` be the exact weighted mean of the *clipped* updates and
``m_hat`` the mean the coordinator returns. Rounding to the nearest level moves each
coordinate of each ``clip(u_i)`` by at most half a step, ``c / (2H)``; ``m_hat - m`` is the
``w``-weighted average of those errors, so per coordinate::

    |m_hat - m| <= c / (2 * H) = clip_range / (2**bits - 2)

independently of the number of sites and of the weights. The bound is for exact arithmetic;
computing ``m_hat`` in float64 adds a relative error below 1e-15 (``S`` is converted to
float64 once), and casting the result to float32 adds at most half a float32 ulp. Clipping
itself is not an error of secure aggregation: choose ``clip_range`` above the largest update
coordinate (``secagg.clip_range``) or the update is deliberately bounded.

Examples
--------
>>> quantization_bound(1.0, 16)  # clip_range 1.0, 16 bits
1.5259254737998596e-05
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fedinfer.errors import SecAggAbort

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "dequantize_mean",
    "encode_contribution",
    "levels",
    "max_weight",
    "quantization_bound",
    "quantize",
]

MIN_BITS = 2
MAX_BITS = 32
_INT64_MAX = (1 << 63) - 1


def levels(bits: int) -> int:
    """Return ``H = 2**(bits - 1) - 1``, the largest quantization level for ``bits`` bits."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}] (got {bits})")
    return (1 << (bits - 1)) - 1


def quantization_bound(clip_range: float, bits: int) -> float:
    """Largest per-coordinate error of the securely aggregated weighted mean update.

    Parameters
    ----------
    clip_range : float
        Updates are clipped to ``[-clip_range, clip_range]`` (``secagg.clip_range``).
    bits : int
        Bits per coordinate (``secagg.bits``).

    Returns
    -------
    float
        ``clip_range / (2**bits - 2)``: half a quantization step. It bounds
        ``|m_hat - m|`` per coordinate, where ``m`` is the weighted mean of the clipped
        updates, for any number of sites and any weights (see the module docstring).

    Examples
    --------
    >>> quantization_bound(0.5, 8)
    0.001968503937007874
    """
    return clip_range / (2 * levels(bits))


def quantize(update: NDArray[np.floating], *, clip_range: float, bits: int) -> NDArray[np.int64]:
    """Clip ``update`` to ``[-clip_range, clip_range]`` and round to the nearest of 2H+1 levels.

    Raises
    ------
    SecAggAbort
        If the update holds NaN or infinity (training diverged; nothing is masked).
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0 (got {clip_range})")
    values = np.array(update, dtype=np.float64)  # a private copy, transformed in place
    if not np.all(np.isfinite(values)):
        raise SecAggAbort("the update holds NaN or infinity; training diverged on this site")
    np.clip(values, -clip_range, clip_range, out=values)
    values *= levels(bits) / clip_range
    return np.rint(values, out=values).astype(np.int64)


def max_weight(*, num_sites: int, bits: int) -> int:
    """Largest site weight for which the sum over ``num_sites`` sites cannot wrap."""
    return _INT64_MAX // (num_sites * levels(bits))


def encode_contribution(
    update: NDArray[np.floating], *, weight: int, clip_range: float, bits: int, num_sites: int
) -> NDArray[np.uint64]:
    """Encode ``[w * q(update), w]`` as a uint64 vector of length ``len(update) + 1``.

    Raises
    ------
    SecAggAbort
        If ``weight`` is not an integer in ``[0, max_weight(...)]``.
    """
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or weight < 0:
        raise SecAggAbort(f"the site weight must be an integer sample count >= 0 (got {weight!r})")
    limit = max_weight(num_sites=num_sites, bits=bits)
    if weight > limit:
        raise SecAggAbort(
            f"weight {weight} could overflow the 64-bit sum of {num_sites} sites at "
            f"{bits} bits (limit {limit}); lower `secagg.bits`"
        )
    q = quantize(update, clip_range=clip_range, bits=bits)
    encoded = np.empty(q.size + 1, dtype=np.int64)
    np.multiply(q, int(weight), out=encoded[:-1])
    encoded[-1] = int(weight)
    return encoded.view(np.uint64)


def dequantize_mean(
    weighted_sum: NDArray[np.int64], total_weight: int, *, clip_range: float, bits: int
) -> NDArray[np.float64]:
    """Turn ``S = sum w_i q_i`` and ``W = sum w_i`` into the weighted mean update (float64).

    Raises
    ------
    SecAggAbort
        If ``total_weight`` is not positive.
    """
    if total_weight <= 0:
        raise SecAggAbort(f"the surviving sites' total weight is {total_weight}; no mean exists")
    scale = clip_range / (levels(bits) * total_weight)
    return weighted_sum.astype(np.float64) * scale
