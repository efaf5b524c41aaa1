"""Lazy on-disk data for every task (issue 13): shards and data functions carry regression
targets and 0/1 label vectors, not only class ids; class folders stay class-only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedinfer.config import PartitionConfig, load_config
from fedinfer.config.validate import validate_config
from fedinfer.data import ArrayDataset, LazyDataset, build_federated_data, load_site_data
from fedinfer.data.function import DATA_ALLOW_ENV
from fedinfer.data.writers import write_shards
from fedinfer.errors import ConfigError, DataError
from fedinfer.fl.site import SiteEnv, local_train
from fedinfer.models import build_model
from fedinfer.privacy import PrivacyLedger
from fedinfer.simulation import run_simulation
from fedinfer.training import get_weights, make_loader
from tests.conftest import tiny_config


def _diabetes() -> ArrayDataset:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    target = ((y - y.mean()) / y.std()).astype(np.float32)
    return ArrayDataset(x.astype(np.float32) * 20, target, 1)


def _digits_multilabel() -> ArrayDataset:
    """Digits with three 0/1 labels per image: even, greater than 4, has a closed loop."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    d = digits.target
    y = np.stack([d % 2 == 0, d > 4, np.isin(d, [0, 6, 8, 9])], axis=1).astype(np.int64)
    return ArrayDataset((digits.data / 16.0).astype(np.float32), y, 3)


DATA = {"regression": _diabetes, "multilabel": _digits_multilabel}


def _one_file(data: ArrayDataset, path: Path) -> Path:
    np.savez(path, x=data.x, y=data.y)
    return path


@pytest.mark.parametrize("task", ["regression", "multilabel"], ids=str)
def test_a_federation_over_shards_scores_as_the_same_data_in_memory(
    task: str, tmp_path: Path
) -> None:
    """Same seed and config: the lazy run's every round metric equals the in-memory run's."""
    # Prepare: the same rows as one in-memory NPZ file and as 4 lazily read shards
    data = DATA[task]()
    shards = write_shards(data, tmp_path / "shards", rows_per_shard=100)
    common = ["model=mlp", "model.hidden_sizes=[16]", "privacy=none", "secagg=off",
              "partition=dirichlet", "partition.alpha=1.0", "federation.lr=0.05"]  # fmt: skip
    memory = tiny_config(
        f"task={task}", "dataset=csv", f"dataset.path={_one_file(data, tmp_path / 'd.npz')}",
        *common,
    )  # fmt: skip
    lazy = tiny_config(f"task={task}", "dataset=shards", f"dataset.path={shards}", *common)
    # Execute
    built = build_federated_data(lazy)
    in_memory = run_simulation(memory, output_dir=tmp_path / "mem").results
    on_disk = run_simulation(lazy, output_dir=tmp_path / "lazy").results
    # Assert: labels kept small and typed for the task, the same partition, the same scores
    assert built.lazy
    train = built.sites[0].train
    assert isinstance(train, LazyDataset)
    if task == "regression":
        assert train.y.dtype == np.float32 and train.y.ndim == 1 and built.num_classes == 1
    else:
        assert train.y.dtype == np.uint8 and train.y.shape[1] == 3 and built.num_classes == 3
    x0, y0 = train[0]
    assert y0.dtype == torch.float32
    assert np.array_equal(y0.numpy(), np.asarray(train.y[0], dtype=np.float32))
    assert on_disk["final_metrics"] == in_memory["final_metrics"]
    assert [r["metrics"] for r in on_disk["rounds"]] == [r["metrics"] for r in in_memory["rounds"]]
    headline = "rmse" if task == "regression" else "accuracy"
    assert set(on_disk["final_metrics"]) >= {headline}


def test_dp_sgd_on_regression_shards_charges_the_exact_sample_rate(tmp_path: Path) -> None:
    """A deployed site's regression shards: Poisson sampling over them, rate batch / len."""
    # Prepare: 20 * 16 = 320 training rows as shards of a site's own directory
    data = _diabetes()
    rows = ArrayDataset(data.x[:320], data.y[:320], 1)
    write_shards(rows, tmp_path / "site", rows_per_shard=64)
    cfg = load_config(
        ["task=regression", "privacy=dpsgd", "model=mlp", "model.hidden_sizes=[8]",
         "federation.batch_size=16", "federation.local_epochs=1", "partition.val_fraction=0",
         "partition.test_fraction=0", "privacy.noise_multiplier=1.0"]
    )  # fmt: skip
    site = load_site_data(
        tmp_path / "site", site_id="site-00", label_column="label", partition=cfg.partition,
        seed=0, num_classes=1, task="regression",
    )  # fmt: skip
    assert isinstance(site.train, LazyDataset) and len(site.train) == 320
    assert site.train.y.dtype == np.float32
    env = SiteEnv("site-00", tmp_path / "state", site, coordinator_public_key=None)
    model = build_model(cfg.model, input_dim=10, num_classes=1, privacy=cfg.privacy)
    # Execute
    outcome = local_train(
        cfg=cfg, env=env, global_weights=get_weights(model), server_round=1, run_id="r"
    )
    # Assert
    entry = PrivacyLedger.read(tmp_path / "state").entries[-1]
    assert entry.sample_rate == 16 / 320 == outcome.metrics["sample-rate"]
    assert entry.steps == 20


def test_a_deployed_site_must_have_the_federations_target_width(tmp_path: Path) -> None:
    write_shards(_digits_multilabel(), tmp_path / "site", rows_per_shard=500)
    with pytest.raises(ConfigError, match="has 3 labels per sample but the federation has"):
        load_site_data(
            tmp_path / "site", site_id="s", label_column="label", seed=0,
            partition=PartitionConfig(name="iid"), num_classes=4, task="multilabel",
        )  # fmt: skip


def test_parquet_shards_carry_several_label_columns_as_a_multilabel_matrix(
    tmp_path: Path,
) -> None:
    data = _digits_multilabel()
    frame = pd.DataFrame(data.x, columns=[f"p{i}" for i in range(64)])
    for j, name in enumerate(("even", "big", "loop")):
        frame[name] = data.y[:, j]
    (tmp_path / "pq").mkdir()
    frame.iloc[:900].to_parquet(tmp_path / "pq" / "a.parquet")
    frame.iloc[900:].to_parquet(tmp_path / "pq" / "b.parquet")
    cfg = tiny_config(
        "task=multilabel", "dataset=shards", f"dataset.path={tmp_path / 'pq'}",
        "dataset.label_column='even,big,loop'", "partition=iid",
    )  # fmt: skip
    built = build_federated_data(cfg)
    test = built.pooled_test
    assert isinstance(test, LazyDataset) and built.num_classes == 3
    assert test.input_dim == 64
    rows = test.indices
    assert np.array_equal(test.y, data.y[rows].astype(np.uint8))
    assert np.array_equal(np.asarray(test.x), data.x[rows])


def test_labels_that_do_not_fit_the_task_give_one_line_errors(tmp_path: Path) -> None:
    """Class folders are class-only; a 1-D y is no multilabel matrix; NaN targets are refused."""
    with pytest.raises(ConfigError, match=r"regression: dataset=folder carries one class"):
        validate_config(tiny_config("task=regression", "dataset=folder", "dataset.path=x"))
    with pytest.raises(ConfigError, match=r"multilabel needs 0/1 label vectors"):
        validate_config(tiny_config("task=multilabel", "dataset=folder", "dataset.path=x"))
    validate_config(tiny_config("task=multilabel", "dataset=shards", "dataset.path=x"))
    digits = _digits_multilabel()
    write_shards(ArrayDataset(digits.x, digits.y[:, 0], 2), tmp_path / "flat", rows_per_shard=900)
    cfg = tiny_config("task=multilabel", "dataset=shards", f"dataset.path={tmp_path / 'flat'}")
    with pytest.raises(DataError, match="multilabel needs a 0/1 label matrix") as info:
        build_federated_data(cfg)
    assert "\n" not in str(info.value)
    bad = _diabetes()
    bad.y[3] = np.nan
    write_shards(bad, tmp_path / "nan", rows_per_shard=200)
    cfg = tiny_config("task=regression", "dataset=shards", f"dataset.path={tmp_path / 'nan'}")
    with pytest.raises(DataError, match="NaN or infinity"):
        build_federated_data(cfg)


# A user's data function returning regression targets ------------------------------------------


class _Targets(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """No ``targets`` attribute: the labels are read by indexing."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def load_site(site_id: str, split: str) -> _Targets:
    """Site ``site-0k`` gets rows of diabetes, two targets each (the target and its square)."""
    data = _diabetes()
    k = int(site_id.split("-")[1])
    start = k * 100 + {"train": 0, "val": 60, "test": 80}[split]
    stop = start + {"train": 60, "val": 20, "test": 20}[split]
    y = np.stack([data.y, data.y**2], axis=1)[start:stop]
    return _Targets(data.x[start:stop], y)


def test_a_data_function_gives_regression_targets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(DATA_ALLOW_ENV, f"{__name__}.load_site")  # the site allows it
    target = f"{__name__}.load_site"
    cfg = tiny_config("task=regression", "dataset=function", f"dataset._target_={target}")
    built = build_federated_data(cfg)
    data = _diabetes()
    site = built.sites[1].train
    assert isinstance(site, LazyDataset) and built.num_classes == 2
    assert np.array_equal(site.y[:, 0], data.y[100:160]) and site.y.dtype == np.float32
    loader = make_loader(site, batch_size=16, shuffle=False, seed=0)
    x, y = next(iter(loader))
    assert y.dtype == torch.float32 and tuple(y.shape) == (16, 2)
    assert torch.equal(x, torch.from_numpy(data.x[100:116]))
