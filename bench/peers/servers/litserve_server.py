"""LitServe serving the ONNX model with its batching (``max_batch_size``, ``batch_timeout``).

    litserve_server.py MODEL.onnx PORT NAME INPUT_DIM CLASSES MAX_BATCH

Request ``{"input": [[...], ...]}`` (rows), response ``{"probabilities": [[...], ...]}``.
"""

from __future__ import annotations

import sys

import litserve as ls
import numpy as np
from ort_model import OrtModel

BATCH_TIMEOUT_S = 0.001


class OnnxAPI(ls.LitAPI):
    def __init__(self, path: str, max_batch_size: int) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=BATCH_TIMEOUT_S)
        self.path = path

    def setup(self, device: str) -> None:
        self.model = OrtModel(self.path)

    def decode_request(self, request: dict) -> np.ndarray:
        return np.asarray(request["input"], dtype=np.float32)

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs  # requests may carry several rows: concatenated in predict

    def predict(self, x: np.ndarray | list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        if isinstance(x, np.ndarray):
            return self.model(x)
        out = self.model(np.concatenate(x))
        return np.split(out, np.cumsum([len(a) for a in x])[:-1])

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, output: np.ndarray) -> dict:
        return {"probabilities": output.tolist()}


def main() -> None:
    path, port, _name, _dim, _classes, max_batch = sys.argv[1:7]
    server = ls.LitServer(OnnxAPI(path, int(max_batch)), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=int(port), generate_client_file=False)


if __name__ == "__main__":
    main()
