"""Flatten a dict of float arrays into one vector in a stable key order, and back.

Secure aggregation masks one flat vector. Every site and the coordinator must lay the
model out identically, so the order is the sorted array names, never dict insertion order.

Examples
--------
>>> arrays = {"b": np.ones(2, np.float32), "a": np.zeros((1, 2), np.float32)}
>>> vector, layout = flatten_arrays(arrays)
>>> vector.tolist(), layout.names
([0.0, 0.0, 1.0, 1.0], ('a', 'b'))
>>> unflatten_vector(vector, layout)["a"].shape
(1, 2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["VectorLayout", "flatten_arrays", "unflatten_vector"]


@dataclass(frozen=True)
class VectorLayout:
    """Names, shapes and dtypes of the arrays packed into a flat vector, in packing order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def size(self) -> int:
        """Total number of coordinates."""
        return sum(math.prod(shape) for shape in self.shapes)

    @classmethod
    def of(cls, arrays: Mapping[str, NDArray[np.floating]]) -> VectorLayout:
        """Describe ``arrays`` (sorted by name); raises ``ValueError`` on a non-float array."""
        names = tuple(sorted(arrays))
        for name in names:
            if not np.issubdtype(arrays[name].dtype, np.floating):
                raise ValueError(f"array {name!r} has dtype {arrays[name].dtype}; expected floats")
        return cls(
            names=names,
            shapes=tuple(tuple(arrays[name].shape) for name in names),
            dtypes=tuple(arrays[name].dtype.str for name in names),
        )


def flatten_arrays(
    arrays: Mapping[str, NDArray[np.floating]],
) -> tuple[NDArray[np.float64], VectorLayout]:
    """Concatenate ``arrays`` in sorted-name order into one float64 vector.

    Returns
    -------
    tuple of (numpy.ndarray, VectorLayout)
        The vector and the layout that :func:`unflatten_vector` needs.
    """
    layout = VectorLayout.of(arrays)
    if not layout.names:
        return np.zeros(0, dtype=np.float64), layout
    parts = [np.asarray(arrays[name], dtype=np.float64).ravel() for name in layout.names]
    return np.concatenate(parts), layout


def unflatten_vector(
    vector: NDArray[np.floating], layout: VectorLayout
) -> dict[str, NDArray[np.floating]]:
    """Split ``vector`` back into named arrays with the layout's shapes and dtypes.

    Raises
    ------
    ValueError
        If ``vector`` does not have exactly ``layout.size`` coordinates.
    """
    if vector.shape != (layout.size,):
        raise ValueError(f"expected a vector of {layout.size} coordinates, got {vector.shape}")
    arrays: dict[str, NDArray[np.floating]] = {}
    offset = 0
    for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes, strict=True):
        count = math.prod(shape)
        arrays[name] = vector[offset : offset + count].reshape(shape).astype(np.dtype(dtype))
        offset += count
    return arrays
