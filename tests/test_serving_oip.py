"""OIP codec: JSON and binary tensors in, JSON and binary tensors out; bad input -> OipError."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedinfer.serving.oip import OipError, encode_infer_response, parse_infer_request


def _binary_request(x: np.ndarray, *, declared: int | None = None) -> tuple[bytes, str]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {
                        "binary_data_size": declared if declared is not None else x.nbytes
                    },
                }
            ]
        }
    )
    return header.encode() + x.tobytes(), str(len(header))


def test_json_and_binary_requests_decode_to_the_same_array() -> None:
    # Prepare
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    json_body = json.dumps(
        {
            "id": "r1",
            "inputs": [
                {"name": "input", "shape": [3, 4], "datatype": "FP32", "data": x.ravel().tolist()}
            ],
        }
    )
    bin_body, header_len = _binary_request(x)
    # Execute
    from_json = parse_infer_request(json_body.encode(), header_length=None)
    from_bin = parse_infer_request(bin_body, header_length=header_len)
    # Assert
    assert from_json.id == "r1" and from_json.outputs is None
    np.testing.assert_array_equal(from_json.inputs[0].array, x)
    np.testing.assert_array_equal(from_bin.inputs[0].array, x)


def test_nested_json_data_is_accepted() -> None:
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}
            ]
        }
    ).encode()
    assert parse_infer_request(body, header_length=None).inputs[0].array.tolist() == [
        [1, 2],
        [3, 4],
    ]


@pytest.mark.parametrize(
    ("body", "header_length", "match"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty 'inputs'"),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32"}]}',
            None,
            "neither 'data'",
        ),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 2], '
            b'"datatype": "BYTES", "data": [1, 2]}]}',
            None,
            "unsupported datatype",
        ),
        (
            b'{"inputs": [{"name": "input", "shape": [1, -2], "datatype": "FP32", "data": [1]}]}',
            None,
            "non-negative",
        ),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}]}',
            None,
            "needs 3",
        ),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 2], '
            b'"datatype": "FP32", "data": ["a", 1]}]}',
            None,
            "list of numbers",
        ),
        (
            b'{"inputs": [{"name": "input", "shape": [2, 2], "datatype": "FP32",'
            b' "data": [[1], [2, 3]]}]}',
            None,
            "list of numbers",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            "9999",
            "outside the body",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            "abc",
            "must be an integer",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],'
            b' "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}',
            None,
            "classification",
        ),
        (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply|JSON object|not valid JSON"),
    ],
    ids=[
        "bad-json",
        "not-object",
        "no-inputs",
        "no-data",
        "bytes-dtype",
        "negative-dim",
        "size-mismatch",
        "string-data",
        "ragged",
        "header-too-long",
        "header-not-int",
        "classification",
        "deep-nesting",
    ],
)
def test_malformed_requests_raise_oip_error(
    body: bytes, header_length: str | None, match: str
) -> None:
    with pytest.raises(OipError, match=match) as info:
        parse_infer_request(body, header_length=header_length)
    assert info.value.status == 400


def test_binary_size_mismatch_and_trailing_bytes_are_rejected() -> None:
    # Prepare
    x = np.ones((2, 3), dtype=np.float32)
    wrong_size, header_len = _binary_request(x, declared=8)
    body, header_len2 = _binary_request(x)
    # Execute / Assert
    with pytest.raises(OipError, match="binary_data_size"):
        parse_infer_request(wrong_size, header_length=header_len)
    with pytest.raises(OipError, match="beyond the declared"):
        parse_infer_request(body + b"xx", header_length=header_len2)
    with pytest.raises(OipError, match="shorter"):
        parse_infer_request(body[:-4], header_length=header_len2)


def test_response_mixes_binary_and_json_outputs() -> None:
    # Prepare
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    classes = np.array([2, 2], dtype=np.int64)
    # Execute
    body, header_len = encode_infer_response(
        model_name="m",
        model_version="4",
        request_id="abc",
        outputs=[("logits", logits, True), ("predicted_class", classes, False)],
    )
    # Assert
    assert header_len is not None
    head = json.loads(body[:header_len])
    assert head["model_version"] == "4" and head["id"] == "abc"
    assert head["outputs"][0]["parameters"]["binary_data_size"] == logits.nbytes
    assert head["outputs"][1] == {
        "name": "predicted_class",
        "datatype": "INT64",
        "shape": [2],
        "data": [2, 2],
    }
    np.testing.assert_array_equal(
        np.frombuffer(body[header_len:], np.float32).reshape(2, 3), logits
    )


def test_repeated_binary_header_binds_each_body_to_its_own_values() -> None:
    """Plans of identical JSON headers are cached: every body still decodes to its own
    tensor, and a cached plan still rejects a body whose binary section is too short."""
    # Prepare
    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    second = -first
    body1, header_len = _binary_request(first)
    body2, header_len2 = _binary_request(second)
    assert header_len == header_len2 and body1[: int(header_len)] == body2[: int(header_len)]
    # Execute
    got1 = parse_infer_request(body1, header_length=header_len).inputs[0].array
    got2 = parse_infer_request(body2, header_length=header_len).inputs[0].array
    # Assert
    np.testing.assert_array_equal(got1, first)
    np.testing.assert_array_equal(got2, second)
    with pytest.raises(OipError, match="shorter"):
        parse_infer_request(body2[:-4], header_length=header_len)


@pytest.mark.parametrize("request_id", [None, "abc"], ids=["cached-header", "with-id"])
def test_all_binary_reply_has_the_documented_header(request_id: str | None) -> None:
    """The cached all-binary reply header is byte-for-byte the general encoding's."""
    # Prepare
    probs = np.full((3, 10), 0.1, dtype=np.float32)
    # Execute
    bodies = [
        encode_infer_response(
            model_name="m",
            model_version="2",
            request_id=request_id,
            outputs=[("probabilities", probs * k, True)],
        )
        for k in (1, 2)
    ]
    # Assert
    for k, (body, header_len) in zip((1, 2), bodies, strict=True):
        assert header_len is not None
        head = json.loads(body[:header_len])
        expected = {
            "model_name": "m",
            "model_version": "2",
            "outputs": [
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": [3, 10],
                    "parameters": {"binary_data_size": probs.nbytes},
                }
            ],
        }
        if request_id is not None:
            expected["id"] = request_id
        assert head == expected
        assert body[:header_len] == json.dumps(expected, separators=(",", ":")).encode()
        np.testing.assert_array_equal(
            np.frombuffer(body[header_len:], np.float32).reshape(3, 10), probs * k
        )
