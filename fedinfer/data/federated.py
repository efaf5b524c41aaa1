"""Per-site data: each site's train / validation / test splits, deterministic by seed.

In a simulation every site rebuilds the same pooled dataset (from the on-disk
cache) and takes its own partition; in a deployment a site reads its own file or
directory. On-disk datasets (``dataset=folder|shards|function``) stay on disk: a site's
splits are index views of a :class:`~fedinfer.data.lazy.LazyDataset`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedinfer.config.schema import DatasetConfig, FedInferConfig, PartitionConfig, TaskConfig
from fedinfer.data.datasets import ArrayDataset, load_dataset, read_table
from fedinfer.data.lazy import (
    ConcatSource,
    LazyDataset,
    check_folder_task,
    open_data_dir,
    open_folder,
    open_shards,
)
from fedinfer.data.partition import partition_indices
from fedinfer.errors import ConfigError, DataError

LAZY_DATASETS = ("folder", "function", "shards")
"""``dataset.name`` values read lazily from disk (never held in memory)."""

_SPLITS = ("train", "val", "test")

SiteDataset = ArrayDataset | LazyDataset
"""A split: in memory, or read from disk on access."""

DATA_FUNCTION_PREFIX = "py:"
"""``fedinfer site --data py:my_pkg.data.load_site`` names a data function, not a path."""

__all__ = [
    "DATA_FUNCTION_PREFIX",
    "LAZY_DATASETS",
    "FederatedData",
    "SiteDataset",
    "SiteData",
    "build_federated_data",
    "load_site_data",
    "load_site_file",
    "site_name",
    "split_site",
]


@dataclass(frozen=True)
class SiteData:
    """One site's local splits; the raw data never leaves the site."""

    site_id: str
    train: SiteDataset
    val: SiteDataset
    test: SiteDataset

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
    pooled_test: SiteDataset

    @property
    def lazy(self) -> bool:
        """Whether the sites' samples are read from disk on access."""
        return isinstance(self.sites[0].train, LazyDataset)

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


def split_site(data: SiteDataset, *, site_id: str, cfg: PartitionConfig, seed: int) -> SiteData:
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
    if dataset_cfg.name in LAZY_DATASETS:  # read from disk on access, never loaded here
        return _lazy_federation(dataset_cfg, partition_cfg, num_sites, seed, task_cfg)
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
    return FederatedData(sites, _pool_tests(sites))


def _lazy_federation(
    cfg: DatasetConfig,
    partition_cfg: PartitionConfig,
    num_sites: int,
    seed: int,
    task_cfg: TaskConfig,
) -> FederatedData:
    """Sites of an on-disk dataset: index views of one folder / shard set, or function calls.

    Labels are read for ``task.kind``; a label-aware partitioner splits their groups
    (:func:`fedinfer.tasks.partition_labels`), as for in-memory data.
    """
    from fedinfer.tasks import partition_labels

    task = task_cfg.kind
    if cfg.name == "function":
        return _function_sites(cfg, num_sites, task)
    if cfg.path is None:
        raise ConfigError(f"`dataset.path` is required for dataset={cfg.name}")
    if cfg.name == "folder":
        check_folder_task(task, cfg.path)
        pooled = open_folder(Path(cfg.path))
    else:
        pooled = open_shards(Path(cfg.path), label_column=cfg.label_column, task=task)
    groups = partition_labels(pooled.y, task, bins=task_cfg.partition_bins)
    indices = partition_indices(groups, num_sites=num_sites, cfg=partition_cfg, seed=seed)
    sites = [
        split_site(pooled.subset(idx), site_id=site_name(i), cfg=partition_cfg, seed=seed)
        for i, idx in enumerate(indices)
    ]
    return FederatedData(sites, _pool_tests(sites))


def _pool_tests(sites: list[SiteData]) -> SiteDataset:
    """Every site's test split together (the coordinator's central evaluation in a simulation)."""
    tests = [s.test for s in sites]
    if isinstance(tests[0], LazyDataset):
        lazy = [t for t in tests if isinstance(t, LazyDataset)]
        if all(t.source is lazy[0].source for t in lazy):  # partitions of one pooled dataset
            return LazyDataset(
                lazy[0].source,
                np.concatenate([t.indices for t in lazy]),
                np.concatenate([t.y for t in lazy]),
                lazy[0].num_classes,
            )
        joined = ConcatSource([t for t in lazy if len(t)])
        return LazyDataset(
            joined, np.arange(len(joined)), np.concatenate([t.y for t in lazy]), lazy[0].num_classes
        )
    arrays = [t for t in tests if isinstance(t, ArrayDataset)]
    return ArrayDataset(
        np.concatenate([t.x for t in arrays]),
        np.concatenate([t.y for t in arrays]),
        sites[0].num_classes,
        sites[0].train.sample_shape,
    )


def _function_sites(cfg: DatasetConfig, num_sites: int, task: str) -> FederatedData:
    """Each simulated site's splits from the user's function, called per site and split."""
    from fedinfer.data.function import load_function_split

    if not cfg._target_:
        raise ConfigError("`dataset._target_` is required for dataset=function")
    sites = []
    for i in range(num_sites):
        splits = {
            split: load_function_split(
                cfg._target_, site_id=site_name(i), split=split, num_classes=cfg.num_classes,
                task=task,
            )  # fmt: skip
            for split in ("train", "val", "test")
        }
        sites.append(SiteData(site_name(i), **splits))
    num_classes = max(s.train.num_classes for s in sites)
    sites = [
        SiteData(
            s.site_id, *(getattr(s, split).with_num_classes(num_classes) for split in _SPLITS)
        )
        for s in sites
    ]
    return FederatedData(sites, _pool_tests(sites))


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
        raise ConfigError(
            f"`dataset.path` directory {cfg.path!r} holds no CSV/Parquet/NPZ files; for class "
            "folders of images use dataset=folder"
        )
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


def load_site_data(
    spec: Path | str,
    *,
    site_id: str,
    label_column: str,
    partition: PartitionConfig,
    seed: int,
    num_classes: int | None = None,
    **options: Any,
) -> SiteData:
    """Load a deployed site's own data (``fedinfer site --data``) and split it locally.

    ``spec`` is a CSV / Parquet / NPZ file (:func:`load_site_file`, read into memory, which
    also gets ``options``), a directory (class folders or NPZ/Parquet shards, read lazily), or
    ``py:my_pkg.data.load_site``, a data function the site's ``$FEDINFER_DATA_TARGETS``
    allows, called for each split. Labels are read for ``options["task"]`` (``task.kind``):
    class folders carry classes only; shards and data functions also carry regression
    targets and 0/1 label vectors.
    """
    text = str(spec)
    if not text.startswith(DATA_FUNCTION_PREFIX) and not Path(text).is_dir():
        return load_site_file(
            Path(text), site_id=site_id, label_column=label_column, partition=partition,
            seed=seed, num_classes=num_classes, **options,
        )  # fmt: skip
    task = str(options.get("task", "multiclass"))
    if text.startswith(DATA_FUNCTION_PREFIX):
        return _site_function(
            text[len(DATA_FUNCTION_PREFIX) :], site_id=site_id, num_classes=num_classes,
            task=task,
        )  # fmt: skip
    table = open_data_dir(Path(text), label_column=label_column, task=task)
    if num_classes is not None and task in ("multilabel", "regression"):
        if table.num_classes != num_classes:
            what = "labels" if task == "multilabel" else "targets"
            raise ConfigError(
                f"{text!r} has {table.num_classes} {what} per sample but the federation has "
                f"`deployment.num_classes`={num_classes}"
            )
    elif num_classes is not None:
        if table.class_names is not None:
            raise DataError(
                f"{text!r} names its classes {list(table.class_names[:5])}; in a deployment "
                "name class folders (or labels) by their integer id 0, 1, ... so that every "
                "site numbers the classes alike"
            )
        _check_classes(table, num_classes, text)
        table = table.with_num_classes(num_classes)
    return split_site(table, site_id=site_id, cfg=partition, seed=seed)


def _check_classes(table: SiteDataset, num_classes: int, where: str) -> None:
    if len(table.y) and int(table.y.max()) >= num_classes:
        raise ConfigError(
            f"{where!r} has label {int(table.y.max())} but the federation has "
            f"{num_classes} classes"
        )


def _site_function(
    target: str, *, site_id: str, num_classes: int | None, task: str = "multiclass"
) -> SiteData:
    from fedinfer.data.function import load_function_split

    splits = {
        split: load_function_split(
            target, site_id=site_id, split=split, num_classes=num_classes, task=task
        )
        for split in _SPLITS
    }
    if num_classes is not None and task in ("multiclass", "binary"):
        for split, data in splits.items():
            _check_classes(data, num_classes, f"{target}({split})")
    if not len(splits["train"]):
        raise DataError(f"{target}(site_id={site_id!r}, split='train') returned no samples")
    return SiteData(site_id, **splits)
