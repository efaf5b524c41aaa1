"""Open Inference Protocol (KServe v2) REST codec: request parsing and response encoding.

Pure functions over bytes and numpy arrays, no web framework. Both tensor
encodings are supported:

* JSON tensors: ``{"name", "shape", "datatype", "data": [...]}``;
* the binary tensor data extension (what ``tritonclient.http`` sends by
  default): the body is a JSON header of ``Inference-Header-Content-Length``
  bytes followed by the raw little-endian tensors, in input order, each
  announced by ``"parameters": {"binary_data_size": n}``.

Every malformed request raises :class:`OipError` carrying the HTTP status and
a message for the ``{"error": ...}`` body; nothing here raises anything else on
bad input.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

__all__ = [
    "HEADER_LENGTH",
    "InferRequest",
    "InputTensor",
    "OipError",
    "RequestedOutput",
    "encode_infer_response",
    "parse_infer_request",
]

HEADER_LENGTH = "inference-header-content-length"

# OIP datatype -> little-endian numpy dtype. BYTES (variable length) is not supported.
_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_OIP_NAMES = {v: k for k, v in _DTYPES.items()}
# numpy kinds of JSON values accepted for each target kind: numbers for numeric
# tensors (integers must be whole numbers), JSON true/false only for BOOL.
_JSON_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}


class OipError(Exception):
    """A request the protocol layer rejects; ``status`` is the HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InputTensor:
    """One decoded input tensor (``array`` already has ``shape`` and the OIP ``datatype``)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray


@dataclass(frozen=True)
class RequestedOutput:
    """One requested output and whether the client wants it as binary data."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A parsed ``POST .../infer`` body."""

    id: str | None
    inputs: tuple[InputTensor, ...]
    outputs: tuple[RequestedOutput, ...] | None
    """None: the client asked for no particular output (return all)."""
    binary_output: bool
    """The default encoding of outputs the client did not list (``binary_data_output``)."""


def parse_infer_request(body: bytes, *, header_length: str | None) -> InferRequest:
    """Decode an inference request body (JSON, or JSON header + binary tensors).

    Parameters
    ----------
    body : bytes
        The full request body.
    header_length : str or None
        The ``Inference-Header-Content-Length`` header value, if sent.

    Raises
    ------
    OipError
        Anything malformed, with a message naming the offending field.
    """
    split = _header_split(body, header_length)
    binary = memoryview(body)[split:]
    if header_length is None:  # all-JSON body: nothing worth caching
        return _plan(_load_json(body)).bind(binary)
    header = body[:split]
    plan = _PLANS.get(header)
    if plan is None:
        plan = _plan(_load_json(header))
        if plan.cacheable and len(header) <= _MAX_CACHED_HEADER:
            if len(_PLANS) >= _MAX_PLANS:  # a client cycling through shapes: start over
                _PLANS.clear()
            _PLANS[header] = plan
    return plan.bind(binary)


@dataclass(frozen=True)
class _BinaryInput:
    """An input whose values follow the JSON header; ``size`` bytes at its offset."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    size: int


@dataclass(frozen=True)
class _Plan:
    """Everything a request's JSON says, ready to be bound to its binary section.

    A client sends the same JSON header with every request of one shape (tritonclient
    does), so plans of all-binary requests are cached by header bytes: the header is
    then parsed and validated once, not on every request.
    """

    id: str | None
    inputs: tuple[InputTensor | _BinaryInput, ...]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool

    @property
    def cacheable(self) -> bool:
        return all(isinstance(t, _BinaryInput) for t in self.inputs)

    def bind(self, binary: memoryview) -> InferRequest:
        inputs, used = [], 0
        for t in self.inputs:
            if isinstance(t, InputTensor):
                inputs.append(t)
                continue
            if used + t.size > len(binary):
                raise OipError(
                    f"input {t.name!r}: binary section is shorter than its binary_data_size"
                )
            array = np.frombuffer(binary[used : used + t.size], dtype=t.dtype).reshape(t.shape)
            inputs.append(InputTensor(t.name, t.datatype, t.shape, array))
            used += t.size
        if used != len(binary):
            raise OipError(
                f"binary section has {len(binary) - used} bytes beyond the declared tensors"
            )
        return InferRequest(self.id, tuple(inputs), self.outputs, self.binary_output)


_PLANS: dict[bytes, _Plan] = {}
_MAX_PLANS = 256
_MAX_CACHED_HEADER = 4096


def _plan(doc: dict[str, Any]) -> _Plan:
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise OipError("request needs a non-empty 'inputs' list")
    inputs = tuple(_parse_input(raw, i) for i, raw in enumerate(raw_inputs))
    params = _dict(doc.get("parameters", {}), "parameters")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OipError("'id' must be a string")
    return _Plan(
        id=request_id,
        inputs=inputs,
        outputs=_parse_outputs(doc.get("outputs")),
        binary_output=bool(params.get("binary_data_output", False)),
    )


def _header_split(body: bytes, header_length: str | None) -> int:
    if header_length is None:
        return len(body)
    try:
        split = int(header_length)
    except ValueError:
        raise OipError("Inference-Header-Content-Length must be an integer") from None
    if not 0 < split <= len(body):
        raise OipError(
            f"Inference-Header-Content-Length {split} is outside the body ({len(body)} bytes)"
        )
    return split


def _load_json(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = _load_json_slow(raw)
    return _dict(doc, "request body")


def _load_json_slow(raw: bytes) -> Any:
    """Parse with the json module, the fallback when orjson refuses the body.

    It also reads the NaN/Infinity literals that Python clients send (which
    ``--nonfinite`` then judges), and words the error for invalid JSON.
    """
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OipError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise OipError("request JSON is nested too deeply") from None


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OipError(f"{what} must be a JSON object")
    return value


def _parse_input(raw: Any, index: int) -> InputTensor | _BinaryInput:
    raw = _dict(raw, f"inputs[{index}]")
    name, shape, datatype = raw.get("name"), raw.get("shape"), raw.get("datatype")
    if not isinstance(name, str) or not name:
        raise OipError(f"inputs[{index}] needs a string 'name'")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise OipError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    dtype = _DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise OipError(f"input {name!r}: unsupported datatype {datatype!r}")
    count = math.prod(shape)
    params = _dict(raw.get("parameters", {}), f"input {name!r} parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != count * dtype.itemsize:
            raise OipError(
                f"input {name!r}: binary_data_size {size!r} does not match "
                f"shape {shape} of {datatype} ({count * dtype.itemsize} bytes)"
            )
        return _BinaryInput(name, datatype, tuple(shape), dtype, size)
    if "data" not in raw:
        raise OipError(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    return InputTensor(name, datatype, tuple(shape), _json_array(raw["data"], name, dtype, shape))


def _json_array(data: Any, name: str, dtype: np.dtype[Any], shape: list[int]) -> np.ndarray:
    if not isinstance(data, list):
        raise OipError(f"input {name!r}: 'data' must be a list")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # 1e39 -> inf, caught by NaN policy
            # Read the JSON values as they are first, so strings ("1.0"), booleans and null
            # are refused (as Triton does) instead of coerced by numpy to numbers and NaN.
            parsed = np.asarray(data)
            if parsed.size and parsed.dtype.kind not in _JSON_KINDS[dtype.kind]:
                raise TypeError(parsed.dtype)
            array = parsed.astype(dtype, copy=False)
    except (ValueError, TypeError, OverflowError):
        raise OipError(
            f"input {name!r}: 'data' must be a (nested) list of numbers "
            f"of one shape for datatype {_OIP_NAMES[dtype]}"
        ) from None
    if array.size != math.prod(shape):
        raise OipError(
            f"input {name!r}: 'data' has {array.size} elements but shape {shape} "
            f"needs {math.prod(shape)}"
        )
    return array.reshape(shape)


def _parse_outputs(raw: Any) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise OipError("'outputs' must be a list")
    outputs = []
    for i, item in enumerate(raw):
        item = _dict(item, f"outputs[{i}]")
        name = item.get("name")
        if not isinstance(name, str):
            raise OipError(f"outputs[{i}] needs a string 'name'")
        params = _dict(item.get("parameters", {}), f"output {name!r} parameters")
        if params.get("classification"):
            raise OipError(
                "the classification extension is not supported; request "
                "'predicted_class' and 'probabilities' instead"
            )
        outputs.append(RequestedOutput(name, bool(params.get("binary_data", False))))
    return tuple(outputs)


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[str, np.ndarray, bool]],
) -> tuple[bytes, int | None]:
    """Encode an inference response.

    Parameters
    ----------
    model_name, model_version : str
        Echoed in the response (``model_version`` names the version that served it).
    request_id : str or None
        Echoed as ``id`` when set.
    outputs : list of (name, array, binary)
        Output tensors in order; ``binary`` selects the binary extension for that one.

    Returns
    -------
    (bytes, int or None)
        The body and, when any output is binary, the JSON header length to send
        as ``Inference-Header-Content-Length``.
    """
    if request_id is None and all(binary for _, _, binary in outputs):
        # The common binary reply: its JSON header depends only on names, types and
        # shapes, so it is encoded once per shape instead of on every request.
        blobs = [np.ascontiguousarray(array).tobytes() for _, array, _ in outputs]
        specs = tuple(
            (name, _OIP_NAMES[array.dtype], array.shape, len(blob))
            for (name, array, _), blob in zip(outputs, blobs, strict=True)
        )
        header = _binary_header(model_name, model_version, specs)
        return b"".join([header, *blobs]), len(header)
    tensors, blobs = [], []
    for name, array, binary in outputs:
        entry: dict[str, Any] = {
            "name": name,
            "datatype": _OIP_NAMES[array.dtype],
            "shape": list(array.shape),
        }
        if binary:
            blob = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = np.ascontiguousarray(array).ravel()  # orjson writes numpy natively
        tensors.append(entry)
    header = _response_header(model_name, model_version, tensors, request_id)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _response_header(
    model_name: str, model_version: str, tensors: list[dict[str, Any]], request_id: str | None
) -> bytes:
    doc: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": tensors,
    }
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


@functools.lru_cache(maxsize=256)
def _binary_header(
    model_name: str, model_version: str, specs: tuple[tuple[str, str, tuple[int, ...], int], ...]
) -> bytes:
    tensors = [
        {
            "name": name,
            "datatype": datatype,
            "shape": list(shape),
            "parameters": {"binary_data_size": size},
        }
        for name, datatype, shape, size in specs
    ]
    return _response_header(model_name, model_version, tensors, None)
