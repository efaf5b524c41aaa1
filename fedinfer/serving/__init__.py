"""The site inference server: Open Inference Protocol REST, dynamic batching, hot swap.

Start one with ``fedinfer serve --model-store DIR`` or, from Python, with
:class:`fedinfer.serving.launch.SiteServer` (a subprocess on a free loopback
port). Batch-score files with ``fedinfer predict``.
"""

__version__ = "0.1.0"

DEFAULT_BACKEND = "onnx"
"""Chosen by measurement (bench/results/serving.md): ONNX Runtime has the lowest forward
latency at batch 1 and 64 for both mlp and cnn1d, with accuracy identical to torch."""

DEFAULT_MAX_BATCH_SIZE = 4096
"""Rows per forward pass. Large enough that 64 concurrent 64-row requests share one pass (as
peers that count their batch in requests do), while 1-row traffic batches whatever is queued;
measured in bench/results/serving_peers.md. A batch only ever holds what is already queued."""

MAX_WORKERS = 64
"""Most ``fedinfer serve --workers`` (``serving.workers``); about one per core is what helps."""

__all__ = ["DEFAULT_BACKEND", "DEFAULT_MAX_BATCH_SIZE", "MAX_WORKERS", "__version__"]
