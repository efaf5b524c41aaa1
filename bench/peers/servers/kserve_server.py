"""KServe's Python ModelServer (V2 REST) serving the ONNX model. No dynamic batching:
KServe batches in a separate agent container in Kubernetes, not in ModelServer.

    kserve_server.py MODEL.onnx PORT NAME INPUT_DIM CLASSES MAX_BATCH
"""

from __future__ import annotations

import functools
import sys

import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from ort_model import OrtModel


class OnnxModel(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.model = OrtModel(path)
        self.ready = True

    def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
        y = self.model(payload.inputs[0].as_numpy())
        out = InferOutput(name="probabilities", shape=list(y.shape), datatype="FP32", data=y)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=[out],
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )


def _loopback_only() -> None:
    """ModelServer hard-codes host 0.0.0.0; this benchmark listens on loopback only."""
    original = uvicorn.Config.__init__

    @functools.wraps(original)
    def init(self: uvicorn.Config, *args: object, **kwargs: object) -> None:
        kwargs["host"] = "127.0.0.1"
        original(self, *args, **kwargs)

    uvicorn.Config.__init__ = init  # type: ignore[method-assign]


def main() -> None:
    path, port, name = sys.argv[1:4]
    _loopback_only()
    ModelServer(http_port=int(port), grpc_port=int(port) + 1, enable_grpc=False, workers=1).start(
        [OnnxModel(name, path)]
    )


if __name__ == "__main__":
    main()
