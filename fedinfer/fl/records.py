"""Conversions between numpy weight dicts and Flower records.

A model's weights travel *packed*: one flat :class:`~flwr.app.Array` per dtype (usually
one, float32), whose record key names the layers it holds, their shapes and places. Not the
dtype: an aggregation may change it (FedAdam returns float64, as it did per layer), and the key
must stay the same, since the adaptive optimisers' state is keyed by it::

    fedinfer.packed.v1:{"layout":[["features.0.weight",[32,1,5],0], ...]}

Flower sends every ``Array`` of a message as its own objects (the array and its chunks), and
in a deployment each object is a signed request through the gateway, a SuperLink database row
and a SuperNode download. Per layer the content of a train message of the default 14-tensor
model was 23 objects; packed it is 5 (``tests/test_records.py``), and a steady 5-site
deployed round went from 8.5 to 3.6-4.0 CPU seconds (``bench/deployment_cpu.py``).
Everything Flower does to the record still holds, because it works element by element over
all arrays of a record: FedAvg's weighted mean, the adaptive optimisers, update clipping (the
L2 norm over all arrays), central DP noise.

Records keyed by layer name (made by hand, or by an older fedinfer) are still read.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["PACKED_PREFIX", "arrays_to_weights", "weights_to_arrays"]

PACKED_PREFIX = "fedinfer.packed.v1:"


def weights_to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    """Pack named numpy arrays into an ArrayRecord: one flat array per dtype, order kept."""
    groups: dict[str, list[tuple[str, np.ndarray, int]]] = {}
    for place, (name, value) in enumerate(weights.items()):
        array = np.asarray(value)
        groups.setdefault(array.dtype.str, []).append((name, array, place))
    record: OrderedDict[str, Array] = OrderedDict()
    for members in groups.values():
        layout = [[name, list(array.shape), place] for name, array, place in members]
        key = PACKED_PREFIX + json.dumps({"layout": layout}, separators=(",", ":"))
        flat = np.concatenate([array.reshape(-1) for _, array, _ in members])
        record[key] = Array(np.ascontiguousarray(flat))
    return ArrayRecord(record)


def arrays_to_weights(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays, in the order they were packed.

    Raises
    ------
    ValueError
        A packed record whose layout does not describe its array (sizes, places, names):
        what a corrupted or crafted message looks like.
    """
    keys = list(arrays.keys())
    packed = [k for k in keys if k.startswith(PACKED_PREFIX)]
    if not packed:
        return {k: v.numpy() for k, v in arrays.items()}
    if len(packed) != len(keys):
        raise ValueError("an ArrayRecord mixes packed weights and named arrays")
    placed: dict[int, tuple[str, np.ndarray]] = {}
    for key in packed:
        flat = arrays[key].numpy()
        for place, name, part in _unpack(key, flat):
            if place in placed:
                raise ValueError(f"packed weights: two arrays claim place {place}")
            placed[place] = (name, part)
    if sorted(placed) != list(range(len(placed))):
        raise ValueError("packed weights: the layout's places are not 0..n-1")
    weights = dict(placed[i] for i in range(len(placed)))
    if len(weights) != len(placed):
        raise ValueError("packed weights: a layer name appears twice")
    return weights


def _unpack(key: str, flat: np.ndarray) -> list[tuple[int, str, np.ndarray]]:
    try:
        spec = json.loads(key[len(PACKED_PREFIX) :])
        entries = [
            (str(name), tuple(int(d) for d in shape), int(place))
            for name, shape, place in spec["layout"]
        ]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"packed weights: unreadable layout ({exc})") from None
    if flat.ndim != 1:
        raise ValueError(f"packed weights: a flat array expected, got shape {flat.shape}")
    if any(d < 0 for _, shape, _ in entries for d in shape):
        raise ValueError("packed weights: a negative dimension in the layout")
    sizes = [math.prod(shape) for _, shape, _ in entries]
    if sum(sizes) != flat.size:
        raise ValueError(
            f"packed weights: the layout describes {sum(sizes)} values, the array holds {flat.size}"
        )
    out, offset = [], 0
    for (name, shape, place), size in zip(entries, sizes, strict=True):
        out.append((place, name, flat[offset : offset + size].reshape(shape)))
        offset += size
    return out
