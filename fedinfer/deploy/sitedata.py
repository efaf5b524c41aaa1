"""Per-site data files for a demo or test deployment, cut exactly as the simulation cuts them.

Site ``i`` gets partition ``i`` of the pooled dataset as an NPZ file (arrays
``x`` and ``y``); named ``site-0i`` it then splits into the same train /
validation / test samples as simulated site ``i``, so a deployment and a
simulation of one config train on identical data.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedinfer.config.schema import FedInferConfig
from fedinfer.data import load_dataset, partition_indices
from fedinfer.fsutil import atomic_write_bytes

__all__ = ["SiteFiles", "write_site_files"]


@dataclass(frozen=True)
class SiteFiles:
    """The files written, and the model shape a coordinator must be told."""

    paths: dict[str, Path]
    input_dim: int
    num_classes: int


def write_site_files(cfg: FedInferConfig, directory: Path, *, names: Sequence[str]) -> SiteFiles:
    """Partition ``cfg.dataset`` over ``names`` and write ``<directory>/<name>.npz`` (0600 each).

    Examples
    --------
    >>> from fedinfer.config import load_config
    >>> files = write_site_files(load_config(["federation.num_sites=3"]), Path("data"),
    ...                          names=["site-00", "site-01", "site-02"])  # doctest: +SKIP
    >>> files.input_dim, files.num_classes  # doctest: +SKIP
    (40, 10)
    """
    from fedinfer.tasks import partition_labels

    pooled = load_dataset(cfg.dataset, seed=cfg.seed, task=cfg.task.kind)
    groups = partition_labels(pooled.y, cfg.task.kind, bins=cfg.task.partition_bins)
    parts = partition_indices(groups, num_sites=len(names), cfg=cfg.partition, seed=cfg.seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, indices in zip(names, parts, strict=True):
        part = pooled.subset(indices)
        paths[name] = _save_npz(directory / f"{name}.npz", x=part.x, y=part.y)
    return SiteFiles(paths=paths, input_dim=pooled.input_dim, num_classes=pooled.num_classes)


def _save_npz(path: Path, *, x: np.ndarray, y: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    return atomic_write_bytes(path, buffer.getvalue())
