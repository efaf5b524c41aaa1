"""MLServer custom runtime: the ONNX model behind MLServer's V2 API (adaptive batching on)."""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from ort_model import OrtModel


class OnnxModel(MLModel):
    async def load(self) -> bool:
        self._model = OrtModel(str(self.settings.parameters.uri))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        y = self._model(x)
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("probabilities", y)]
        )
