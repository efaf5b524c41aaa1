"""On-disk datasets read lazily: image folders, NPZ/Parquet shards, a user's data function."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedinfer.config import DatasetConfig, PartitionConfig, load_config
from fedinfer.data import (
    ArrayDataset,
    LazyDataset,
    build_federated_data,
    load_dataset,
    load_site_data,
    open_data_dir,
    open_folder,
    open_shards,
)
from fedinfer.data import lazy as lazy_module
from fedinfer.data.function import DATA_ALLOW_ENV
from fedinfer.data.writers import write_folder, write_shards
from fedinfer.errors import ConfigError, DataError
from fedinfer.fl.site import SiteEnv, local_train
from fedinfer.models import build_model
from fedinfer.privacy import PrivacyLedger
from fedinfer.training import get_weights, make_loader
from tests.conftest import tiny_config

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_dataset(DatasetConfig(name="digits"), seed=0)


@pytest.fixture(scope="module")
def npy_folder(digits: ArrayDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(digits, tmp_path_factory.mktemp("npy") / "digits", sample_shape=SHAPE)


def _as_arrays(data: LazyDataset) -> tuple[np.ndarray, np.ndarray]:
    return data.rows(0, len(data)), data.y


def _sorted_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    table = np.column_stack([y, x])
    return table[np.lexsort(table.T[::-1])]


def test_an_image_folder_is_indexed_without_reading_pixels(
    npy_folder: Path, digits: ArrayDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Indexing reads headers only; every sample is read back exactly, labelled by its folder."""
    # Prepare: any pixel read while indexing fails the test
    def no_read(path: Path) -> np.ndarray:
        raise AssertionError(f"read {path} while indexing")

    monkeypatch.setattr(lazy_module, "_read_npy", no_read)
    # Execute
    data = open_folder(npy_folder)
    monkeypatch.undo()
    # Assert
    assert isinstance(data, LazyDataset)
    assert len(data) == len(digits) and data.num_classes == 10 and data.sample_shape == SHAPE
    np.testing.assert_array_equal(np.bincount(data.y), np.bincount(digits.y))
    x, y = _as_arrays(data)
    np.testing.assert_array_equal(_sorted_rows(x, y), _sorted_rows(digits.x, digits.y))
    features, label = data[5]
    assert features.dtype == torch.float32 and features.shape == (64,) and label.dtype == torch.int64


def test_png_folders_read_as_channel_first_images(digits: ArrayDataset, tmp_path: Path) -> None:
    small = digits.subset(np.arange(50))
    data = open_folder(write_folder(small, tmp_path / "png", sample_shape=SHAPE, suffix=".png"))
    assert data.sample_shape == SHAPE and len(data) == 50
    x, y = _as_arrays(data)
    expected = np.rint(small.x * 255) / 255  # 8-bit pixels
    np.testing.assert_allclose(_sorted_rows(x, y), _sorted_rows(expected, small.y), atol=1e-6)


@pytest.mark.parametrize("compressed", [False, True], ids=["memmap", "compressed"])
def test_npz_shards_read_rows_across_shards(
    digits: ArrayDataset, tmp_path: Path, compressed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_shards(digits, tmp_path / "shards", rows_per_shard=400, sample_shape=SHAPE,
                        compressed=compressed)  # fmt: skip
    data = open_shards(root)
    assert len(data) == len(digits) and data.sample_shape == SHAPE
    np.testing.assert_array_equal(data.y, digits.y)
    order = np.random.default_rng(0).permutation(len(data))[:300]  # Poisson-like random access
    np.testing.assert_array_equal(np.stack([data[i][0].numpy() for i in order]), digits.x[order])
    batch = data.__getitems__(order.tolist())  # the DataLoader's batched fetch: one gather
    assert all(torch.equal(bx, data[i][0]) and int(by) == int(data.y[i])
               for (bx, by), i in zip(batch, order, strict=True))  # fmt: skip
    assert ("decoded whole" in caplog.text) == compressed  # 5 compressed shards > cache of 2
    if not compressed:  # uncompressed members are memory-mapped, not decoded
        assert isinstance(data.source._shard(0), np.memmap)  # type: ignore[attr-defined]


def test_parquet_shards(digits: ArrayDataset, tmp_path: Path) -> None:
    root = tmp_path / "pq"
    root.mkdir()
    for k, start in enumerate(range(0, 750, 250)):
        frame = pd.DataFrame(digits.x[start : start + 250], columns=[f"f{i}" for i in range(64)])
        frame["label"] = digits.y[start : start + 250]
        frame.to_parquet(root / f"part-{k}.parquet")
    data = open_data_dir(root)
    assert len(data) == 750 and data.input_dim == 64
    np.testing.assert_array_equal(data.rows(0, 750), digits.x[:750])
    np.testing.assert_array_equal(data.y, digits.y[:750])


def test_errors_are_one_line_and_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a directory") as missing:
        open_folder(tmp_path / "nope")
    (tmp_path / "d" / "0").mkdir(parents=True)
    (tmp_path / "d" / "1").mkdir()
    np.save(tmp_path / "d" / "0" / "a.npy", np.zeros(SHAPE, np.float32))
    with pytest.raises(DataError, match=r"class folder .*1.* holds no \.png or \.npy") as empty:
        open_folder(tmp_path / "d")
    np.save(tmp_path / "d" / "1" / "b.npy", np.zeros((1, 8, 7), np.float32))
    with pytest.raises(DataError, match=r"b\.npy.* has shape \[1, 8, 7\] but") as shapes:
        open_folder(tmp_path / "d")
    (tmp_path / "s").mkdir()
    np.savez(tmp_path / "s" / "a.npz", x=np.zeros((3, 4)), y=np.arange(3))
    np.savez(tmp_path / "s" / "b.npz", x=np.zeros((3, 5)), y=np.arange(3))
    with pytest.raises(DataError, match=r"b\.npz.* shape \[5\] but") as shard_shapes:
        open_shards(tmp_path / "s")
    for error in (missing, empty, shapes, shard_shapes):
        assert "\n" not in str(error.value)


def test_a_pickled_sample_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    """An object-array .npy is a pickle: loading it would run code. It must be refused unread."""
    # Prepare: a pickle that creates a file when unpickled
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))  # type: ignore[return-value]

    root = tmp_path / "evil"
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        np.save(root / label / "ok.npy", np.zeros(SHAPE, np.float32))
    evil = np.full(SHAPE, None, dtype=object)  # the right shape: only the dtype gives it away
    evil[0, 0, 0] = Payload()
    np.save(root / "1" / "zz.npy", evil, allow_pickle=True)
    assert b"pwned" in (root / "1" / "zz.npy").read_bytes()  # the payload really is there
    refused = "holds Python objects|without unpickling"
    # Execute / Assert
    with pytest.raises(DataError, match=refused):
        open_folder(root)
    with pytest.raises(DataError, match=refused):
        lazy_module._read_npy(root / "1" / "zz.npy")
    (tmp_path / "sh").mkdir()
    with open(tmp_path / "sh" / "a.npz", "wb") as fh:
        np.savez(fh, x=evil[None], y=np.arange(1))
    with pytest.raises(DataError, match=refused):
        open_shards(tmp_path / "sh")
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload()))  # the payload works when unpickled ...
    assert marker.exists()  # ... so its absence above means nothing unpickled it


def test_workers_read_the_same_batches(npy_folder: Path) -> None:
    data = open_folder(npy_folder).subset(np.arange(300))
    batches = []
    for workers in (0, 2):
        loader = make_loader(data, batch_size=64, shuffle=True, seed=7, num_workers=workers)
        batches.append([(x.clone(), y.clone()) for x, y in loader])
    for (x0, y0), (x2, y2) in zip(*batches, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_simulation_partitions_a_folder_and_pools_a_lazy_test_split(npy_folder: Path) -> None:
    cfg = tiny_config("dataset=folder", f"dataset.path={npy_folder}", "partition=dirichlet")
    data = build_federated_data(cfg)
    assert data.lazy and data.sample_shape == SHAPE and data.num_classes == 10
    sizes = [len(getattr(s, split)) for s in data.sites for split in ("train", "val", "test")]
    assert sum(sizes) == 1797
    train_ids = np.concatenate([s.train.indices for s in data.sites])  # type: ignore[union-attr]
    assert len(set(train_ids.tolist())) == len(train_ids), "sites never share a sample"
    assert len(data.pooled_test) == sum(len(s.test) for s in data.sites)


def test_dp_sgd_on_a_lazy_folder_charges_the_exact_sample_rate(
    npy_folder: Path, tmp_path: Path
) -> None:
    """Poisson sampling over the on-disk dataset; the ledger's rate is batch / len exactly."""
    # Prepare: a deployed site's own directory; 64 * 20 = 1280 training samples
    cfg = load_config(
        ["privacy=dpsgd", "model=logreg", "federation.batch_size=64", "federation.local_epochs=1",
         "partition.val_fraction=0", "partition.test_fraction=0", "privacy.noise_multiplier=1.0",
         "dataset.num_workers=1"]
    )  # fmt: skip
    subset = tmp_path / "site"
    full = open_folder(npy_folder)
    write_folder(ArrayDataset(full.rows(0, 1280), full.y[:1280], 10), subset, sample_shape=SHAPE)
    site = load_site_data(
        subset, site_id="site-00", label_column="label", partition=cfg.partition, seed=0,
        num_classes=10,
    )  # fmt: skip
    assert isinstance(site.train, LazyDataset) and len(site.train) == 1280
    env = SiteEnv("site-00", tmp_path / "state", site, coordinator_public_key=None)
    model = build_model(cfg.model, input_dim=64, num_classes=10, privacy=cfg.privacy)
    # Execute
    outcome = local_train(
        cfg=cfg, env=env, global_weights=get_weights(model), server_round=1, run_id="r"
    )
    # Assert
    entry = PrivacyLedger.read(tmp_path / "state").entries[-1]
    assert entry.sample_rate == 64 / 1280 == outcome.metrics["sample-rate"]
    assert entry.steps == 20
    assert outcome.metrics["train-accuracy"] > 0


def test_a_site_directory_must_fit_the_federation(npy_folder: Path) -> None:
    with pytest.raises(ConfigError, match="has label 9 but the federation has 5 classes"):
        load_site_data(npy_folder, site_id="s", label_column="label",
                       partition=PartitionConfig(name="iid"), seed=0, num_classes=5)  # fmt: skip


# A user's data function, imported by the site from its allow-list ------------------------------


class _Tensors(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.targets = torch.from_numpy(x).reshape(-1, *SHAPE), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.targets[i]


def load_site(site_id: str, split: str) -> _Tensors:
    """The data function under test: site ``site-0k`` gets a slice of the digits."""
    data = load_dataset(DatasetConfig(name="digits"), seed=0)
    k = int(site_id.split("-")[1])
    start = k * 400 + {"train": 0, "val": 300, "test": 350}[split]
    stop = start + {"train": 300, "val": 50, "test": 50}[split]
    return _Tensors(data.x[start:stop], data.y[start:stop])


TARGET = f"{__name__}.load_site"


def test_a_data_function_off_the_allow_list_is_never_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(DATA_ALLOW_ENV, "other_pkg.*")
    cfg = tiny_config("dataset=function", f"dataset._target_={TARGET}")
    with pytest.raises(ConfigError, match=f"FEDINFER_DATA_TARGETS={TARGET}"):
        build_federated_data(cfg)
    with pytest.raises(ConfigError, match="not on this site's allow-list"):
        load_site_data(f"py:{TARGET}", site_id="site-00", label_column="label",
                       partition=cfg.partition, seed=0)  # fmt: skip


def test_a_data_function_gives_each_site_its_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ALLOW_ENV, f"{__name__}.*")  # a prefix entry
    cfg = tiny_config("dataset=function", f"dataset._target_={TARGET}", "federation.num_sites=3")
    data = build_federated_data(cfg)
    assert data.lazy and data.sample_shape == SHAPE and data.num_classes == 10
    assert [len(s.train) for s in data.sites] == [300, 300, 300]
    digits = load_dataset(DatasetConfig(name="digits"), seed=0)
    np.testing.assert_array_equal(data.sites[1].test.x, digits.x[750:800])
    assert len(data.pooled_test) == 150
    np.testing.assert_array_equal(data.pooled_test.y[50:100], digits.y[750:800])


def test_a_custom_cnn_federates_over_png_folders_with_dp(
    digits: ArrayDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole simulation on a lazy dataset: shape from the files, DP, central evaluation."""
    from fedinfer.models.custom import ALLOW_ENV
    from fedinfer.simulation import run_simulation

    monkeypatch.setenv(ALLOW_ENV, "")
    root = write_folder(digits, tmp_path / "png", sample_shape=SHAPE, suffix=".png")
    cfg = tiny_config(
        "dataset=folder", f"dataset.path={root}", "model=custom",
        "model._target_=examples.images.net.DigitsCnn", "+model.kwargs.channels=8",
        "privacy=dpsgd", "privacy.fix_model=true", "secagg=off", "federation.num_sites=2",
        "federation.rounds=2", "federation.batch_size=64", "partition=iid",
    )  # fmt: skip
    result = run_simulation(cfg, output_dir=tmp_path / "run")
    assert result.results["config"]["model"]["input_shape"] == [1, 8, 8]  # from the PNG headers
    assert result.final_accuracy is not None and result.final_accuracy > 0.2  # chance: 0.1
    assert not (tmp_path / "run" / "site_data").exists()  # nothing copied out of the folder
    ledger = PrivacyLedger.read(tmp_path / "run" / "sites" / "site-00")
    assert ledger.entries and ledger.epsilon > 0


def test_lazy_rows_read_only_what_is_sliced(
    npy_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = open_folder(npy_folder)
    reads: list[Path] = []
    original = lazy_module._read_npy
    monkeypatch.setattr(lazy_module, "_read_npy", lambda p: reads.append(p) or original(p))
    head = data.x[:4]
    assert head.shape == (4, 64) and len(reads) == 4
    np.testing.assert_array_equal(data.x[[7, 2]], np.stack([data.x[7], data.x[2]]))
    assert data.x.shape == (len(data), 64)


@pytest.mark.slow  # one Ray start: ~30 s on the shared 2-core box
def test_ray_actors_read_the_folder_themselves_with_workers(
    npy_folder: Path, tmp_path: Path
) -> None:
    """On Flower's Ray runtime nothing is copied out of the folder; DataLoader workers read it."""
    from fedinfer.simulation import run_simulation

    cfg = tiny_config(
        "simulation.runtime=ray", "dataset=folder", f"dataset.path={npy_folder}",
        "dataset.num_workers=1", "model=logreg", "privacy=dpsgd", "secagg=off",
        "federation.num_sites=2", "federation.rounds=1", "partition=iid",
    )  # fmt: skip
    result = run_simulation(cfg, output_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "site_data").exists()
    assert result.final_accuracy is not None and result.final_accuracy > 0.2
    for site in ("site-00", "site-01"):
        assert PrivacyLedger.read(tmp_path / "run" / "sites" / site).epsilon > 0


def test_a_coordinator_cannot_choose_a_deployed_sites_records(
    npy_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run config's dataset.* (the coordinator's) never selects what a deployed site reads.

    A coordinator asks for a data function of its choosing and absurd worker counts; the site
    reads its own --data directory, imports nothing, and caps workers at its core count.
    """
    import os

    from flwr.app import Context, RecordDict

    from fedinfer.fl.run_config import NodeConfigKeys
    from fedinfer.fl.site import deployment_resolver

    # Prepare: an importable "data function" that leaves a mark when imported
    mark = tmp_path / "imported"
    (tmp_path / "coordinator_pick.py").write_text(
        f"from pathlib import Path\nPath({str(mark)!r}).touch()\n"
        "def load_site(site_id, split):\n    raise SystemExit('coordinator data')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(DATA_ALLOW_ENV, "coordinator_pick.*")  # even if the site allowed it
    cfg = load_config(
        ["dataset=function", "dataset._target_=coordinator_pick.load_site",
         "dataset.num_workers=100000", "model=logreg"]
    )  # fmt: skip
    node = {NodeConfigKeys.DATA_PATH: str(npy_folder), NodeConfigKeys.STATE_DIR: str(tmp_path),
            NodeConfigKeys.SITE_NAME: "site-00"}  # fmt: skip
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    # Execute
    env = deployment_resolver(cfg, num_classes=10)(context)
    loader = make_loader(env.data.train, batch_size=8, shuffle=True, seed=0,
                         num_workers=cfg.dataset.num_workers)  # fmt: skip
    # Assert
    assert isinstance(env.data.train, LazyDataset)
    assert sum(len(getattr(env.data, s)) for s in ("train", "val", "test")) == 1797
    assert not mark.exists()
    assert loader.num_workers == (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["dataset=folder"], "`dataset.path` is required for dataset=folder"),
        (["dataset=shards"], "`dataset.path` is required for dataset=shards"),
        (["dataset=function"], "`dataset._target_` is required for dataset=function"),
        (["dataset.num_workers=-1"], "`dataset.num_workers` must be >= 0"),
    ],
    ids=["folder-path", "shards-path", "function-target", "workers"],
)
def test_config_mistakes_name_the_key(overrides: list[str], key: str) -> None:
    from fedinfer.config.validate import validate_config

    with pytest.raises(ConfigError, match=re.escape(key)):
        validate_config(load_config(overrides))


def test_rgb_and_16_bit_pngs(tmp_path: Path) -> None:
    from PIL import Image

    for label in ("0", "1"):
        (tmp_path / "rgb" / label).mkdir(parents=True)
        Image.fromarray(np.full((4, 5, 3), 51, np.uint8)).save(tmp_path / "rgb" / label / "a.png")
    rgb = open_folder(tmp_path / "rgb")
    assert rgb.sample_shape == (3, 4, 5)
    np.testing.assert_allclose(rgb.read(0), 0.2)
    (tmp_path / "g16" / "0").mkdir(parents=True)
    (tmp_path / "g16" / "1").mkdir()
    for label in ("0", "1"):
        Image.fromarray(np.full((2, 2), 100, np.uint16)).save(tmp_path / "g16" / label / "a.png")
    grey = open_folder(tmp_path / "g16")
    assert grey.sample_shape == (1, 2, 2)
    np.testing.assert_allclose(grey.read(0), 100 / 65535)


def test_a_deployed_site_must_number_its_classes(tmp_path: Path) -> None:
    """Named class folders are numbered per site: two sites lacking different classes would
    disagree on the ids, so a deployed site refuses names (a simulation numbers them once)."""
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "a.npy", np.zeros(3, np.float32))
    assert open_folder(tmp_path).class_names == ("cat", "dog")
    with pytest.raises(DataError, match="by their integer id 0, 1"):
        load_site_data(tmp_path, site_id="s", label_column="label",
                       partition=PartitionConfig(name="iid"), seed=0, num_classes=2)  # fmt: skip


@pytest.mark.usefixtures("example_sandbox")
def test_the_image_example_reads_png_class_folders(tmp_path: Path) -> None:
    """``python examples/images/run.py --png``: the script writes the folders, sites read them."""
    from examples.images.run import main

    out = tmp_path / "run"
    summary = main(["--runtime", "inprocess", "--sites", "3", "--rounds", "1", "--png",
                    "--out", str(out)])  # fmt: skip
    assert len(list((out / "images").glob("*/*.png"))) == 1797
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["dataset"]["name"] == "folder" and config["model"]["input_shape"] == [1, 8, 8]
    assert summary["served_input_shape"] == [-1, 1, 8, 8] and summary["predict_rows"] == 200


def test_the_site_worker_reloads_a_folder_when_a_file_inside_a_class_folder_changes(
    npy_folder: Path, tmp_path: Path
) -> None:
    """The worker's data cache is keyed by the whole tree, not only the top directory."""
    import os
    import shutil

    from flwr.app import Context, RecordDict

    from fedinfer.fl.run_config import NodeConfigKeys
    from fedinfer.fl.site import deployment_resolver

    # Prepare: a private copy of the folder dataset, and a resolver with a cache
    data = shutil.copytree(npy_folder, tmp_path / "digits")
    cfg = load_config(["dataset=folder", f"dataset.path={data}", "model=logreg"])
    node = {NodeConfigKeys.DATA_PATH: str(data), NodeConfigKeys.STATE_DIR: str(tmp_path),
            NodeConfigKeys.SITE_NAME: "site-00"}  # fmt: skip
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    resolve = deployment_resolver(cfg, num_classes=10, cache={})
    first = resolve(context)
    assert resolve(context) is first  # unchanged data: served from the cache
    # Execute: rewrite one sample two levels down (same size), with a later mtime
    sample = next(p for p in sorted((data / "3").iterdir()) if p.suffix == ".npy")
    stat = sample.stat()
    np.save(sample, -np.load(sample))
    os.utime(sample, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns))  # top dir untouched
    second = resolve(context)
    # Assert
    assert second is not first
