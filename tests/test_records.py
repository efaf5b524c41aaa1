"""Weights travel packed: one Array per dtype instead of one per layer.

Each Array of a message is its own Flower objects (array + chunks), and in a deployment each
object is a signed request through the gateway and database rows in the SuperLink.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedinfer.config import load_config
from fedinfer.fl.records import PACKED_PREFIX, arrays_to_weights, weights_to_arrays
from fedinfer.models import build_model
from fedinfer.training import get_weights


def _default_model_weights() -> dict[str, np.ndarray]:
    cfg = load_config([])
    model = build_model(cfg.model, input_dim=40, num_classes=10, privacy=cfg.privacy)
    return get_weights(model)


def _objects(record: ArrayRecord) -> int:
    content = RecordDict({"arrays": record, "config": ConfigRecord({"r": 1})})
    return len(get_all_nested_objects(content))


def test_weights_round_trip_with_names_order_shapes_and_dtypes() -> None:
    # Prepare: mixed dtypes interleaved, a scalar, an empty tensor
    weights = {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "conv.bias": np.array([0.5, -1.5], dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "head": np.ones((3, 2), dtype=np.float64),
    }
    # Execute
    record = weights_to_arrays(weights)
    back = arrays_to_weights(record)
    # Assert
    assert len(record) == 3  # float32, int64, float64
    assert list(back) == list(weights)
    for name, value in weights.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)


def test_a_message_of_the_default_model_carries_a_few_objects_not_one_per_layer() -> None:
    # Prepare
    weights = _default_model_weights()
    per_layer = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})
    # Execute
    packed, named = _objects(weights_to_arrays(weights)), _objects(per_layer)
    # Assert: 14 tensors were an array object each, plus their chunks (equal chunks are shared)
    assert len(weights) == 14
    assert packed <= 5 and named >= 4 * packed, (packed, named)


def test_fedavg_over_packed_records_equals_fedavg_per_layer() -> None:
    """Flower's weighted mean works element by element: packing changes nothing in it."""
    # Prepare
    rng = np.random.default_rng(0)
    sites = [
        {
            "w": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=3).astype(np.float32),
        }
        for _ in range(3)
    ]
    examples = [10.0, 30.0, 60.0]

    def replies(pack: bool) -> list[RecordDict]:
        return [
            RecordDict(
                {
                    "arrays": weights_to_arrays(w)
                    if pack
                    else ArrayRecord({k: Array(v) for k, v in w.items()}),
                    "metrics": MetricRecord({"num-examples": n}),
                }
            )
            for w, n in zip(sites, examples, strict=True)
        ]

    # Execute
    packed = arrays_to_weights(aggregate_arrayrecords(replies(True), "num-examples"))
    named = arrays_to_weights(aggregate_arrayrecords(replies(False), "num-examples"))
    # Assert
    assert list(packed) == ["w", "b"]
    for name in named:
        np.testing.assert_allclose(packed[name], named[name], rtol=1e-6)


def test_records_keyed_by_layer_name_are_still_read() -> None:
    record = ArrayRecord({"a": Array(np.ones(2, dtype=np.float32))})
    assert list(arrays_to_weights(record)) == ["a"]


def _crafted(layout: object, flat: np.ndarray) -> ArrayRecord:
    key = PACKED_PREFIX + json.dumps({"layout": layout})
    return ArrayRecord({key: Array(flat)})


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (_crafted([["a", [10**9], 0]], np.zeros(4, np.float32)), "describes 1000000000 values"),
        (_crafted([["a", [2], 0], ["b", [2], 0]], np.zeros(4, np.float32)), "claim place 0"),
        (_crafted([["a", [2], 1]], np.zeros(2, np.float32)), "not 0..n-1"),
        (_crafted([["a", [-2], 0]], np.zeros(2, np.float32)), "negative dimension"),
        (_crafted([["a", [2], 0], ["a", [2], 1]], np.zeros(4, np.float32)), "appears twice"),
        (_crafted("nonsense", np.zeros(2, np.float32)), "unreadable layout"),
        (
            ArrayRecord({PACKED_PREFIX + "{not json": Array(np.zeros(2, np.float32))}),
            "unreadable layout",
        ),
        (
            ArrayRecord(
                {
                    **_crafted([["a", [2], 0]], np.zeros(2, np.float32)),
                    "b": Array(np.zeros(1, np.float32)),
                }
            ),
            "mixes packed weights and named arrays",
        ),
    ],
    ids=["size", "place-twice", "places", "negative", "name-twice", "layout", "json", "mixed"],
)
def test_a_crafted_layout_is_refused_with_a_reason(record: ArrayRecord, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        arrays_to_weights(record)
