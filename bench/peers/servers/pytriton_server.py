"""PyTriton (bundled Triton Inference Server) serving the ONNX model with dynamic batching.

pytriton_server.py MODEL.onnx PORT NAME INPUT_DIM CLASSES MAX_BATCH
"""

from __future__ import annotations

import sys

import numpy as np
from ort_model import OrtModel
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    path, port, name, dim, classes, max_batch = sys.argv[1:7]
    model = OrtModel(path)

    @batch
    def infer(input: np.ndarray) -> dict[str, np.ndarray]:  # noqa: A002 (the tensor's name)
        return {"probabilities": model(input)}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=int(port),
        grpc_address="127.0.0.1",
        grpc_port=int(port) + 1,
        metrics_address="127.0.0.1",
        metrics_port=int(port) + 2,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=name,
            infer_func=infer,
            inputs=[Tensor(name="input", dtype=np.float32, shape=(int(dim),))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(int(classes),))],
            config=ModelConfig(
                max_batch_size=int(max_batch),
                batcher=DynamicBatcher(max_queue_delay_microseconds=0),
            ),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
