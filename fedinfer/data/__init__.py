"""Datasets, partitioners and per-site splits."""

from fedinfer.data.datasets import DATASET_NAMES, ArrayDataset, load_dataset, read_table
from fedinfer.data.federated import (
    LAZY_DATASETS,
    FederatedData,
    SiteData,
    SiteDataset,
    build_federated_data,
    load_site_data,
    load_site_file,
    site_name,
    split_site,
)
from fedinfer.data.lazy import LazyDataset, open_data_dir, open_folder, open_shards, worker_count
from fedinfer.data.partition import PARTITION_NAMES, partition_indices

__all__ = [
    "DATASET_NAMES",
    "LAZY_DATASETS",
    "PARTITION_NAMES",
    "ArrayDataset",
    "FederatedData",
    "LazyDataset",
    "SiteData",
    "SiteDataset",
    "build_federated_data",
    "load_dataset",
    "load_site_data",
    "load_site_file",
    "open_data_dir",
    "open_folder",
    "open_shards",
    "partition_indices",
    "read_table",
    "site_name",
    "split_site",
    "worker_count",
]
