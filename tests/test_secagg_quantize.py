"""Fixed-point encoding of updates, its documented error bound, and vector layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedinfer.errors import SecAggAbort
from fedinfer.secagg.layout import VectorLayout, flatten_arrays, unflatten_vector
from fedinfer.secagg.quantize import (
    dequantize_mean,
    encode_contribution,
    max_weight,
    quantization_bound,
    quantize,
)


@pytest.mark.parametrize(
    ("clip_range", "bits", "expected"),
    [(1.0, 16, 1 / 65534), (0.5, 8, 0.5 / 254), (2.0, 2, 1.0)],
    ids=["16-bit", "8-bit", "2-bit"],
)
def test_quantization_bound_is_half_a_step(clip_range: float, bits: int, expected: float) -> None:
    assert quantization_bound(clip_range, bits) == pytest.approx(expected)


floats = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False, width=32)


@settings(max_examples=80, deadline=None)
@given(
    updates=st.lists(arrays(np.float32, 17, elements=floats), min_size=1, max_size=6),
    weights=st.data(),
    bits=st.integers(min_value=2, max_value=24),
    clip_range=st.sampled_from([0.1, 1.0, 2.5]),
)
def test_weighted_mean_is_within_the_documented_bound(
    updates: list[np.ndarray], weights: st.DataObject, bits: int, clip_range: float
) -> None:
    # Prepare
    n = len(updates)
    w = weights.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n))
    encoded = [
        encode_contribution(u, weight=wi, clip_range=clip_range, bits=bits, num_sites=n).view(
            np.int64
        )
        for u, wi in zip(updates, w, strict=True)
    ]
    total = np.sum(encoded, axis=0)
    # Execute
    mean = dequantize_mean(total[:-1], int(total[-1]), clip_range=clip_range, bits=bits)
    # Assert
    clipped = [np.clip(u.astype(np.float64), -clip_range, clip_range) for u in updates]
    plain = sum(wi * c for wi, c in zip(w, clipped, strict=True)) / sum(w)
    assert int(total[-1]) == sum(w)
    bound = quantization_bound(clip_range, bits)
    assert np.max(np.abs(mean - plain)) <= bound * (1 + 1e-9) + 1e-12


def test_zero_update_is_exactly_zero() -> None:
    assert not np.any(quantize(np.zeros(8, np.float32), clip_range=1.0, bits=16))


def test_clipping_saturates_at_the_extreme_levels() -> None:
    q = quantize(np.array([-5.0, 5.0]), clip_range=1.0, bits=8)
    assert q.tolist() == [-127, 127]


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_update_aborts(bad: float) -> None:
    with pytest.raises(SecAggAbort, match="NaN or infinity"):
        quantize(np.array([0.0, bad]), clip_range=1.0, bits=16)


def test_weight_that_could_overflow_the_sum_aborts() -> None:
    limit = max_weight(num_sites=10, bits=16)
    encode_contribution(np.zeros(2), weight=limit, clip_range=1.0, bits=16, num_sites=10)
    with pytest.raises(SecAggAbort, match="lower `secagg.bits`"):
        encode_contribution(np.zeros(2), weight=limit + 1, clip_range=1.0, bits=16, num_sites=10)


@pytest.mark.parametrize("weight", [-1, 2.5, True], ids=["negative", "float", "bool"])
def test_weight_must_be_a_sample_count(weight: object) -> None:
    with pytest.raises(SecAggAbort, match="integer sample count"):
        encode_contribution(
            np.zeros(2),
            weight=weight,
            clip_range=1.0,
            bits=16,  # type: ignore[arg-type]
            num_sites=2,
        )


def test_zero_total_weight_has_no_mean() -> None:
    with pytest.raises(SecAggAbort, match="total weight is 0"):
        dequantize_mean(np.zeros(3, np.int64), 0, clip_range=1.0, bits=16)


# --- layout -------------------------------------------------------------------------------


def test_flatten_order_is_sorted_not_insertion_order() -> None:
    # Prepare
    a = {"w": np.full((2, 2), 1, np.float32), "b": np.full(3, 2, np.float32)}
    b = {"b": a["b"], "w": a["w"]}
    # Execute
    va, la = flatten_arrays(a)
    vb, lb = flatten_arrays(b)
    # Assert
    np.testing.assert_array_equal(va, vb)
    assert la == lb and la.names == ("b", "w") and la.size == 7


def test_unflatten_restores_shapes_and_dtypes() -> None:
    arrays_in = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(1, np.float64)}
    vector, layout = flatten_arrays(arrays_in)
    out = unflatten_vector(vector, layout)
    for name, arr in arrays_in.items():
        np.testing.assert_array_equal(out[name], arr)
        assert out[name].dtype == arr.dtype


def test_layout_rejects_integer_arrays_and_wrong_lengths() -> None:
    with pytest.raises(ValueError, match="expected floats"):
        VectorLayout.of({"steps": np.zeros(1, np.int64)})
    _, layout = flatten_arrays({"x": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="3 coordinates"):
        unflatten_vector(np.zeros(4), layout)
