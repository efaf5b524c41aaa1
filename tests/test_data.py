from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedinfer.config import DatasetConfig, PartitionConfig
from fedinfer.data import build_federated_data, load_dataset, partition_indices
from fedinfer.errors import ConfigError, DataError
from tests.conftest import tiny_config

LABELS = np.repeat(np.arange(10), 100)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
def test_partition_is_deterministic_disjoint_and_non_empty(name: str) -> None:
    cfg = PartitionConfig(name=name, alpha=0.5, labels_per_site=2)
    first = partition_indices(LABELS, num_sites=8, cfg=cfg, seed=3)
    second = partition_indices(LABELS, num_sites=8, cfg=cfg, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    merged = np.concatenate(first)
    assert len(merged) == len(set(merged.tolist())) == len(LABELS)
    assert min(len(p) for p in first) >= cfg.min_samples_per_site


def test_other_seed_gives_other_partition() -> None:
    cfg = PartitionConfig(name="dirichlet", alpha=0.5)
    a = partition_indices(LABELS, num_sites=5, cfg=cfg, seed=0)
    b = partition_indices(LABELS, num_sites=5, cfg=cfg, seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _label_skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between site label histograms and the global one."""
    glob = np.bincount(LABELS, minlength=10) / len(LABELS)
    return float(
        np.mean(
            [
                0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - glob).sum()
                for p in parts
            ]
        )
    )


def test_smaller_alpha_is_more_non_iid() -> None:
    skews = [
        _label_skew(
            partition_indices(
                LABELS, num_sites=10, cfg=PartitionConfig(name="dirichlet", alpha=a), seed=0
            )
        )
        for a in (0.1, 1.0, 100.0)
    ]
    assert skews[0] > skews[1] > skews[2]


def test_shards_limit_labels_per_site() -> None:
    parts = partition_indices(
        LABELS, num_sites=10, cfg=PartitionConfig(name="shards", labels_per_site=2), seed=0
    )
    assert (
        max(len(np.unique(LABELS[p])) for p in parts) <= 3
    )  # a shard may straddle one label boundary


def test_more_sites_than_samples_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="federation.num_sites"):
        partition_indices(np.arange(20) % 2, num_sites=50, cfg=PartitionConfig(name="iid"), seed=0)


def test_mnist1d_is_generated_and_cached(tmp_path: Path) -> None:
    cfg = DatasetConfig(name="mnist1d", num_samples=200, cache_dir=str(tmp_path))
    first = load_dataset(cfg, seed=0)
    assert first.x.shape == (200, 40) and first.num_classes == 10
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1
    again = load_dataset(cfg, seed=0)
    np.testing.assert_array_equal(first.x, again.x)


@pytest.mark.parametrize("name,dim,classes", [("digits", 64, 10), ("breast_cancer", 30, 2)])
def test_sklearn_bundled_sets(name: str, dim: int, classes: int) -> None:
    data = load_dataset(DatasetConfig(name=name), seed=0)
    assert data.input_dim == dim and data.num_classes == classes


def _write_table(path: Path, n: int = 300) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(n, 5)), columns=[f"f{i}" for i in range(5)])
    frame["target"] = rng.integers(0, 3, size=n)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        np.savez(path, x=frame.drop(columns=["target"]).to_numpy(), y=frame["target"].to_numpy())


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npz"])
def test_user_files_single_and_per_site(tmp_path: Path, suffix: str) -> None:
    single = tmp_path / f"all{suffix}"
    _write_table(single)
    cfg = tiny_config("dataset=csv", f"dataset.path={single}", "dataset.label_column=target")
    fed = build_federated_data(cfg)
    assert len(fed.sites) == 4 and fed.input_dim == 5 and fed.num_classes == 3
    site_dir = tmp_path / "sites"
    site_dir.mkdir()
    for i in range(3):
        _write_table(site_dir / f"site{i}{suffix}", n=100)
    fed = build_federated_data(
        tiny_config(
            "dataset=csv",
            f"dataset.path={site_dir}",
            "dataset.label_column=target",
            "federation.num_sites=3",
        )
    )
    assert [len(s.train) + len(s.val) + len(s.test) for s in fed.sites] == [100, 100, 100]


def test_missing_file_and_label_column_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_federated_data(tiny_config("dataset=csv", f"dataset.path={tmp_path / 'nope.csv'}"))
    path = tmp_path / "t.csv"
    _write_table(path)
    with pytest.raises(DataError, match="label_column"):
        build_federated_data(
            tiny_config("dataset=csv", f"dataset.path={path}", "dataset.label_column=nope")
        )


def test_sites_get_train_val_test_splits() -> None:
    fed = build_federated_data(tiny_config())
    for site in fed.sites:
        assert len(site.train) > len(site.test) > 0 and len(site.val) > 0
    assert len(fed.pooled_test) == sum(len(s.test) for s in fed.sites)
