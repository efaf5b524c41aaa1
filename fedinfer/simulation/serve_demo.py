"""The end of the main job: every site serves the final global model and answers a request."""

from __future__ import annotations

from pathlib import Path

from fedinfer.config.schema import FedInferConfig

__all__ = ["serve_sites"]


def serve_sites(cfg: FedInferConfig, *, output_dir: Path) -> dict[str, dict[str, object]]:
    """Start each site's inference server on its model store, query it, report; stop unless keep_alive."""
    raise NotImplementedError("serving demo: waiting for fedinfer.serving.launch")
