"""TorchServe custom handler: the ONNX model, requests batched by TorchServe's frontend.

A request body is either raw little-endian float32 rows (``application/octet-stream``,
answered with raw float32 probabilities) or JSON ``{"data": [[...], ...]}`` (answered
with a JSON list of rows).
"""

from __future__ import annotations

import json
import os

import numpy as np
from ort_model import OrtModel


class OnnxHandler:
    def initialize(self, context) -> None:  # noqa: ANN001 (TorchServe's Context)
        model_dir = context.system_properties["model_dir"]
        serialized = context.manifest["model"]["serializedFile"]
        self.model = OrtModel(os.path.join(model_dir, serialized))
        self.input_dim = int(os.environ.get("FEDINFER_BENCH_INPUT_DIM", "40"))
        self.initialized = True

    def handle(self, data: list[dict], context) -> list[object]:  # noqa: ANN001
        arrays, binary = [], []
        for request in data:
            body = request.get("body") if request.get("body") is not None else request.get("data")
            if isinstance(body, (bytes, bytearray)):
                try:  # JSON sent without a JSON content type arrives as bytes too
                    body = json.loads(body)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    arrays.append(np.frombuffer(body, dtype="<f4").reshape(-1, self.input_dim))
                    binary.append(True)
                    continue
            arrays.append(np.asarray(body["data"], dtype=np.float32))
            binary.append(False)
        out = self.model(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        replies, start = [], 0
        for x, raw in zip(arrays, binary, strict=True):
            part = out[start : start + len(x)]
            start += len(x)
            replies.append(part.tobytes() if raw else part.tolist())
        return replies
