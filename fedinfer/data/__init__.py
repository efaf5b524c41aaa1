"""Datasets, partitioners and per-site splits."""

from fedinfer.data.datasets import DATASET_NAMES, ArrayDataset, load_dataset, read_table
from fedinfer.data.federated import (
    FederatedData,
    SiteData,
    build_federated_data,
    load_site_file,
    site_name,
    split_site,
)
from fedinfer.data.partition import PARTITION_NAMES, partition_indices

__all__ = [
    "DATASET_NAMES",
    "PARTITION_NAMES",
    "ArrayDataset",
    "FederatedData",
    "SiteData",
    "build_federated_data",
    "load_dataset",
    "load_site_file",
    "partition_indices",
    "read_table",
    "site_name",
    "split_site",
]
