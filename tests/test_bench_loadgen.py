"""The load generator's per-peer request adapters (bench/serving_loadgen.py) encode what
each server expects, checked against our own OIP codec where the protocol is OIP."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import serving_loadgen as loadgen  # noqa: E402

from fedinfer.serving.oip import encode_infer_response, parse_infer_request  # noqa: E402

X = np.arange(2 * 5, dtype=np.float32).reshape(2, 5) / 7


def _body_and_headers(request: loadgen.HttpRequest) -> tuple[bytes, dict[str, str]]:
    head, _, body = request.encode("127.0.0.1", 8080).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    return body, headers


@pytest.mark.parametrize("peer", loadgen.OIP_PEERS)
@pytest.mark.parametrize("fmt", ["json", "binary"])
def test_oip_requests_decode_to_the_rows_sent(peer: str, fmt: str) -> None:
    if fmt == "binary" and peer not in loadgen.BINARY_PEERS:
        with pytest.raises(ValueError, match="no binary"):
            loadgen.build_request(peer, fmt, "m", X)
        return
    # Execute
    request = loadgen.build_request(peer, fmt, "m", X)
    body, headers = _body_and_headers(request)
    parsed = parse_infer_request(body, header_length=headers.get("inference-header-content-length"))
    # Assert
    assert request.path == "/v2/models/m/infer"
    np.testing.assert_allclose(parsed.inputs[0].array, X, rtol=1e-7)
    assert parsed.outputs is not None and [o.name for o in parsed.outputs] == ["probabilities"]
    assert parsed.outputs[0].binary == (fmt == "binary")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_oip_responses_decode_to_the_probabilities(binary: bool) -> None:
    probs = np.full((2, 10), 0.1, dtype=np.float32)
    body, header_len = encode_infer_response(
        model_name="m",
        model_version="1",
        request_id=None,
        outputs=[("logits", probs * 3, binary), ("probabilities", probs, binary)],
    )
    headers = {} if header_len is None else {"inference-header-content-length": str(header_len)}
    got = loadgen.decode_response("fedinfer", "binary" if binary else "json", headers, body, 10)
    np.testing.assert_array_equal(got, probs)


def test_native_formats_of_torchserve_and_litserve() -> None:
    raw = loadgen.build_request("torchserve", "binary", "m", X)
    as_json = loadgen.build_request("torchserve", "json", "m", X)
    lit = loadgen.build_request("litserve", "json", "m", X)
    assert raw.path == as_json.path == "/predictions/m" and lit.path == "/predict"
    np.testing.assert_array_equal(np.frombuffer(raw.body, "<f4").reshape(2, 5), X)
    np.testing.assert_allclose(json.loads(as_json.body)["data"], X, rtol=1e-7)
    np.testing.assert_allclose(json.loads(lit.body)["input"], X, rtol=1e-7)
    out = X[:, :2]
    assert np.array_equal(
        loadgen.decode_response("torchserve", "binary", {}, out.tobytes(), 2), out
    )
    lit_reply = json.dumps({"probabilities": out.tolist()}).encode()
    np.testing.assert_array_equal(
        loadgen.decode_response("litserve", "json", {}, lit_reply, 2), out
    )
