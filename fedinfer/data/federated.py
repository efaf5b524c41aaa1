"""Per-site data: each site's train / validation / test splits, deterministic by seed.

In a simulation every site rebuilds the same pooled dataset (from the on-disk
cache) and takes its own partition; in a deployment a site reads its own file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedinfer.config.schema import DatasetConfig, FedInferConfig, PartitionConfig, TaskConfig
from fedinfer.data.datasets import ArrayDataset, load_dataset, read_table
from fedinfer.data.partition import partition_indices
from fedinfer.errors import ConfigError

__all__ = [
    "FederatedData",
    "SiteData",
    "build_federated_data",
    "load_site_file",
    "site_name",
    "split_site",
]


@dataclass(frozen=True)
class SiteData:
    """One site's local splits; the raw data never leaves the site."""

    site_id: str
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset

    @property
    def input_dim(self) -> int:
        """Features per sample."""
        return self.train.input_dim

    @property
    def num_classes(self) -> int:
        """Number of classes of the federation."""
        return self.train.num_classes


@dataclass(frozen=True)
class FederatedData:
    """All sites of a simulation plus the pooled test split for central evaluation."""

    sites: list[SiteData]
    pooled_test: ArrayDataset

    @property
    def input_dim(self) -> int:
        """Features per sample."""
        return self.sites[0].input_dim

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.sites[0].num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The per-sample shape (``(1, 8, 8)`` for digits; else ``(input_dim,)``)."""
        return self.sites[0].train.sample_shape or (self.input_dim,)


def site_name(index: int) -> str:
    """The id of the simulated site with partition index ``index`` (``site-00`` ...)."""
    return f"site-{index:02d}"


def split_site(data: ArrayDataset, *, site_id: str, cfg: PartitionConfig, seed: int) -> SiteData:
    """Shuffle one site's samples and cut them into train / validation / test."""
    n = len(data)
    rng = np.random.default_rng([seed, _stable_hash(site_id)])
    order = rng.permutation(n)
    n_test = int(round(n * cfg.test_fraction))
    n_val = int(round(n * cfg.val_fraction))
    n_test, n_val = min(n_test, n - 1), min(n_val, max(n - 1 - n_test, 0))
    test, val, train = np.split(order, [n_test, n_test + n_val])
    return SiteData(site_id, data.subset(train), data.subset(val), data.subset(test))


def _stable_hash(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") ^ len(text)


def build_federated_data(cfg: FedInferConfig) -> FederatedData:
    """Build every site's splits for a simulation (cached per process).

    Labels are read for ``task.kind``. A label-aware partitioner (dirichlet, shards) splits
    the classes; on a regression target it splits ``task.partition_bins`` quantile bins of
    the target, on multi-label data the distinct label sets
    (:func:`fedinfer.tasks.partition_labels`).
    """
    return _build_cached(
        _freeze(cfg.dataset),
        _freeze(cfg.partition),
        cfg.federation.num_sites,
        cfg.seed,
        _freeze(cfg.task),
    )


def _freeze(obj: DatasetConfig | PartitionConfig | TaskConfig) -> tuple[tuple[str, object], ...]:
    return tuple(sorted(vars(obj).items()))


@functools.lru_cache(maxsize=4)
def _build_cached(
    dataset_items: tuple[tuple[str, object], ...],
    partition_items: tuple[tuple[str, object], ...],
    num_sites: int,
    seed: int,
    task_items: tuple[tuple[str, object], ...] = (),
) -> FederatedData:
    from fedinfer.tasks import partition_labels

    dataset_cfg = DatasetConfig(**dict(dataset_items))  # type: ignore[arg-type]
    partition_cfg = PartitionConfig(**dict(partition_items))  # type: ignore[arg-type]
    task_cfg = TaskConfig(**dict(task_items))  # type: ignore[arg-type]
    task = task_cfg.kind
    site_files = _site_files(dataset_cfg)
    if site_files is not None:
        if len(site_files) != num_sites:
            raise ConfigError(
                f"`dataset.path` holds {len(site_files)} site files but `federation.num_sites`="
                f"{num_sites}; set federation.num_sites={len(site_files)}"
            )
        tables = [
            read_table(f, label_column=dataset_cfg.label_column, task=task) for f in site_files
        ]
        num_classes = max(t.num_classes for t in tables)
        parts = [ArrayDataset(t.x, t.y, num_classes) for t in tables]
    else:
        pooled = load_dataset(dataset_cfg, seed=seed, task=task)
        groups = partition_labels(pooled.y, task, bins=task_cfg.partition_bins)
        indices = partition_indices(groups, num_sites=num_sites, cfg=partition_cfg, seed=seed)
        parts = [pooled.subset(idx) for idx in indices]
    sites = [
        split_site(part, site_id=site_name(i), cfg=partition_cfg, seed=seed)
        for i, part in enumerate(parts)
    ]
    pooled_test = ArrayDataset(
        np.concatenate([s.test.x for s in sites]),
        np.concatenate([s.test.y for s in sites]),
        sites[0].num_classes,
        sites[0].train.sample_shape,
    )
    return FederatedData(sites, pooled_test)


def _site_files(cfg: DatasetConfig) -> list[Path] | None:
    """A directory ``dataset.path`` means one file per site, in sorted order."""
    if cfg.name != "csv" or cfg.path is None or not Path(cfg.path).is_dir():
        return None
    files = sorted(
        p
        for p in Path(cfg.path).iterdir()
        if p.suffix.lower() in (".csv", ".parquet", ".pq", ".npz")
    )
    if not files:
        raise ConfigError(f"`dataset.path` directory {cfg.path!r} holds no CSV/Parquet/NPZ files")
    return files


def load_site_file(
    path: Path,
    *,
    site_id: str,
    label_column: str,
    partition: PartitionConfig,
    seed: int,
    num_classes: int | None = None,
    task: str = "multiclass",
) -> SiteData:
    """Load a deployed site's own data file and split it locally (labels read for ``task``)."""
    table = read_table(path, label_column=label_column, task=task)
    if num_classes is not None and task in ("multilabel", "regression"):
        if table.num_classes != num_classes:
            what = "labels" if task == "multilabel" else "targets"
            raise ConfigError(
                f"{str(path)!r} has {table.num_classes} {what} per row but the federation has "
                f"`deployment.num_classes`={num_classes}"
            )
    elif num_classes is not None:
        if table.num_classes > num_classes:
            raise ConfigError(
                f"{str(path)!r} has label {table.num_classes - 1} but the federation has "
                f"{num_classes} classes"
            )
        table = ArrayDataset(table.x, table.y, num_classes)
    return split_site(table, site_id=site_id, cfg=partition, seed=seed)
