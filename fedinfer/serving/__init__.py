"""The site inference server: Open Inference Protocol REST, dynamic batching, hot swap.

Start one with ``fedinfer serve --model-store DIR`` or, from Python, with
:class:`fedinfer.serving.launch.SiteServer` (a subprocess on a free loopback
port). Batch-score files with ``fedinfer predict``.
"""

__version__ = "0.1.0"

DEFAULT_BACKEND = "onnx"
"""Chosen by measurement: see bench/results/serving.md (backend table)."""

__all__ = ["DEFAULT_BACKEND", "__version__"]
