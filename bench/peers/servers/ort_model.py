"""The model as every peer runs it: ONNX Runtime on CPU, configured like ``fedinfer serve``.

Same ONNX file, same session options as fedinfer's onnx backend (1 intra-op and 1
inter-op thread, no spinning), softmax in numpy: only the server around it differs.
Runs inside each peer's own virtual environment (numpy + onnxruntime only).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class OrtModel:
    """``x (rows, input_dim) float32 -> probabilities (rows, classes) float32``."""

    def __init__(self, path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: np.asarray(x, dtype=np.float32)})[0]
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
