"""Conversions between numpy weight dicts and Flower records."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["arrays_to_weights", "weights_to_arrays"]


def weights_to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    """Wrap named numpy arrays in an ArrayRecord, preserving key order."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in weights.items()))


def arrays_to_weights(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Unwrap an ArrayRecord into named numpy arrays."""
    return {k: v.numpy() for k, v in arrays.items()}
