"""A deployed site's own data: what ``fedinfer site --data`` accepts, and demo data to feed it.

``--data`` names, on the site and only there (a coordinator never chooses a site's records):

* a CSV / Parquet / NPZ file, read into memory;
* a directory read lazily, sample by sample: class folders (``<dir>/<class>/<n>.png|.npy``)
  or NPZ / Parquet shards (``<dir>/*.npz``);
* ``py:my_pkg.data.load_site``, a data function called as ``load_site(site_id=NAME,
  split=...)``, imported only if the site's ``$FEDINFER_DATA_TARGETS`` names it.

:func:`inspect_site_data` opens it once when the site starts, so a missing directory, an
empty class folder or mismatched sample shapes stop ``fedinfer site`` with a one-line error
before it connects. The coordinator is told only the model's target and shapes
(``deployment.input_dim``, ``deployment.num_classes``, ``model.input_shape``), never data.

For a demo or test deployment, :func:`write_site_files` cuts the configured dataset
exactly as the simulation cuts it: site ``i`` gets partition ``i`` (as ``<name>.npz`` or,
with ``layout``, as a class-folder or shard directory), so a deployment and a simulation of
one config train on identical samples.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedinfer.config.schema import FedInferConfig, PartitionConfig
from fedinfer.data import SiteData, load_dataset, load_site_data, partition_indices
from fedinfer.data.federated import DATA_FUNCTION_PREFIX, SiteDataset
from fedinfer.data.lazy import LazyDataset
from fedinfer.data.writers import write_folder, write_shards
from fedinfer.errors import ConfigError, DataError
from fedinfer.fsutil import atomic_write_bytes

__all__ = [
    "LAYOUTS",
    "SiteDataInfo",
    "SiteFiles",
    "data_spec",
    "inspect_site_data",
    "sample_rows",
    "write_site_files",
]

LAYOUTS = ("npz", "folder", "png", "shards")
"""How :func:`write_site_files` writes a site's data: one NPZ file, class folders of NPY
or PNG samples, or NPZ shards."""


@dataclass(frozen=True)
class SiteFiles:
    """The files written, and the model shape a coordinator must be told."""

    paths: dict[str, Path]
    input_dim: int
    num_classes: int
    sample_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class SiteDataInfo:
    """What a site's data looks like (printed at start; never sent to the coordinator)."""

    spec: str
    num_samples: int
    sample_shape: tuple[int, ...]
    num_classes: int
    lazy: bool
    targets: bool = False
    """True when the labels are not class ids (regression values or label vectors)."""

    def describe(self) -> str:
        """One line for the site's log."""
        how = "read lazily" if self.lazy else "in memory"
        labels = f"{self.num_classes} target column(s)" if self.targets else (
            f"{self.num_classes} classes"
        )
        return (
            f"{self.spec}: {self.num_samples} samples of shape {list(self.sample_shape)}, "
            f"{labels} ({how})"
        )


def data_spec(value: str | Path) -> str:
    """The node-config form of ``--data``: ``py:target`` as given, a path made absolute."""
    text = str(value)
    if text.startswith(DATA_FUNCTION_PREFIX):
        target = text[len(DATA_FUNCTION_PREFIX) :]
        if not target or not target.replace(".", "").replace("_", "").isalnum():
            raise ConfigError(
                f"--data {text!r} names no function; write --data py:my_pkg.data.load_site"
            )
        return text
    return str(Path(text).resolve())


def inspect_site_data(
    spec: str | Path, *, site_id: str, label_column: str = "label"
) -> SiteDataInfo:
    """Open ``--data`` as the ClientApp will (headers and labels only for lazy data).

    Raises
    ------
    ConfigError or DataError
        A missing path, a data function off the allow-list, an empty class folder, mismatched
        sample shapes ...: one line naming the problem.
    """
    spec = data_spec(spec)
    if not spec.startswith(DATA_FUNCTION_PREFIX) and not Path(spec).exists():
        raise ConfigError(
            f"--data {spec} does not exist; give a CSV/Parquet/NPZ file, a data directory, "
            "or py:my_pkg.data.load_site"
        )
    # The site does not know the run's task before the coordinator asks (the ClientApp checks
    # the labels against it then): labels that are not class ids are read as targets here.
    targets = False
    try:
        site = _open_for_inspection(spec, site_id, label_column, task="multiclass")
        named = isinstance(site.train, LazyDataset) and site.train.class_names is not None
        if named and not _is_class_folder(spec):
            raise DataError("labels are not class ids")  # float targets read as names
    except DataError as first:
        try:
            site, targets = _open_for_inspection(spec, site_id, label_column, "regression"), True
        except (ConfigError, DataError):
            raise first from None
    parts: list[SiteDataset] = [site.train, site.val, site.test]
    train = site.train
    if isinstance(train, LazyDataset) and train.class_names is not None:
        raise DataError(
            f"--data {spec} names its classes {list(train.class_names[:5])}; name class "
            "folders (or labels) by their integer id 0, 1, ... so that every site numbers the "
            "classes alike"
        )
    return SiteDataInfo(
        spec=spec,
        num_samples=sum(len(p) for p in parts),
        sample_shape=tuple(train.sample_shape or (train.input_dim,)),
        num_classes=max(p.num_classes for p in parts),
        lazy=isinstance(train, LazyDataset),
        targets=targets,
    )


def _is_class_folder(spec: str) -> bool:
    """A directory of class folders (``<dir>/<class>/<file>``) rather than shards."""
    path = Path(spec)
    return path.is_dir() and any(p.is_dir() for p in path.iterdir())


def _open_for_inspection(spec: str, site_id: str, label_column: str, task: str) -> SiteData:
    return load_site_data(
        spec, site_id=site_id, label_column=label_column,
        partition=PartitionConfig(name="iid", val_fraction=0.0, test_fraction=0.0), seed=0,
        task=task,
    )  # fmt: skip


def sample_rows(spec: str | Path, n: int, *, label_column: str = "label") -> np.ndarray:
    """The first ``n`` samples of a site's data, flat float32 (to query its server)."""
    site = load_site_data(
        data_spec(spec), site_id="probe", label_column=label_column,
        partition=PartitionConfig(name="iid", val_fraction=0.0, test_fraction=0.0), seed=0,
    )  # fmt: skip
    train = site.train
    if isinstance(train, LazyDataset):
        return train.rows(0, n)
    return np.asarray(train.x[:n], dtype=np.float32)


def write_site_files(
    cfg: FedInferConfig, directory: Path, *, names: Sequence[str], layout: str = "npz"
) -> SiteFiles:
    """Partition ``cfg.dataset`` over ``names`` and write each site's data under ``directory``.

    ``layout`` ``npz``: ``<name>.npz`` (0600 each); ``folder`` / ``png``: ``<name>/<class>/``
    of NPY / PNG samples; ``shards``: ``<name>/shard-*.npz``.

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
    shape = _sample_shape(cfg, pooled.input_dim, pooled.sample_shape, layout)
    paths = {}
    for name, indices in zip(names, parts, strict=True):
        part = pooled.subset(indices)
        if layout == "npz":
            paths[name] = _save_npz(directory / f"{name}.npz", x=part.x, y=part.y)
        elif layout == "shards":
            paths[name] = write_shards(
                part, directory / name, rows_per_shard=max(len(part) // 3, 1), sample_shape=shape
            )
        else:
            suffix = ".png" if layout == "png" else ".npy"
            paths[name] = write_folder(part, directory / name, sample_shape=shape, suffix=suffix)
    return SiteFiles(
        paths=paths,
        input_dim=pooled.input_dim,
        num_classes=pooled.num_classes,
        sample_shape=shape,
    )


def _sample_shape(
    cfg: FedInferConfig, input_dim: int, natural: tuple[int, ...] | None, layout: str
) -> tuple[int, ...]:
    """The shape samples are written in: ``model.input_shape``, else the data's own."""
    if layout not in LAYOUTS:
        raise ConfigError(f"site data layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    shape = tuple(cfg.model.input_shape or natural or (input_dim,))
    if math.prod(shape) != input_dim:
        raise ConfigError(
            f"`model.input_shape` {list(shape)} does not fit the data's {input_dim} "
            "features per sample"
        )
    return shape


def _save_npz(path: Path, *, x: np.ndarray, y: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    return atomic_write_bytes(path, buffer.getvalue())
