"""Site data written once per run and memory-mapped by the actors (fedinfer/data/shared.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedinfer.data import build_federated_data
from fedinfer.data.shared import SPLITS, _open, open_site, write_shared_sites
from fedinfer.errors import DataError
from fedinfer.fl.run_config import NodeConfigKeys
from fedinfer.fl.site import simulation_resolver
from tests.conftest import tiny_config


@pytest.fixture
def federation():
    return build_federated_data(tiny_config("federation.num_sites=5", "partition=dirichlet"))


def test_every_site_reads_back_exactly_its_own_rows(federation, tmp_path: Path) -> None:
    root = write_shared_sites(federation, tmp_path / "site_data")
    for i, site in enumerate(federation.sites):
        mapped = open_site(root, i)
        assert mapped.site_id == site.site_id
        for split in SPLITS:
            ours, theirs = getattr(mapped, split), getattr(site, split)
            np.testing.assert_array_equal(ours.x, theirs.x)
            np.testing.assert_array_equal(ours.y, theirs.y)
            assert ours.num_classes == theirs.num_classes
            assert ours.x.dtype == np.float32 and ours.y.dtype == np.int64


def test_files_are_mapped_not_loaded_and_sites_get_writable_copies(
    federation, tmp_path: Path
) -> None:
    root = write_shared_sites(federation, tmp_path / "site_data")
    _meta, arrays = _open(str(root))
    x, y = arrays["train"]
    assert isinstance(x, np.memmap) and isinstance(y, np.memmap), "shared pages, not a copy"
    assert not x.flags.writeable, "no actor can change another site's data"
    site = open_site(root, 2)
    assert not isinstance(site.train.x, np.memmap) and site.train.x.flags.writeable
    assert len(site.train) < x.shape[0], "a site holds only its own rows"


def test_the_files_hold_every_row_once(federation, tmp_path: Path) -> None:
    root = write_shared_sites(federation, tmp_path / "site_data")
    for split in SPLITS:
        rows = np.load(root / f"{split}_y.npy", mmap_mode="r").shape[0]
        assert rows == sum(len(getattr(s, split)) for s in federation.sites)


def test_bad_index_and_missing_files_are_data_errors(federation, tmp_path: Path) -> None:
    root = write_shared_sites(federation, tmp_path / "site_data")
    with pytest.raises(DataError, match="outside the 5 sites"):
        open_site(root, 5)
    with pytest.raises(DataError, match="index.json is missing"):
        open_site(tmp_path / "nowhere", 0)


def test_the_simulation_resolver_gives_the_same_site_either_way(tmp_path: Path) -> None:
    cfg = tiny_config("federation.num_sites=3")
    root = write_shared_sites(build_federated_data(cfg), tmp_path / "site_data")
    context = Context(run_id=1, node_id=7, node_config={NodeConfigKeys.PARTITION_ID: 1},
                      state=RecordDict(), run_config={})
    plain = simulation_resolver(cfg, output_dir=tmp_path, coordinator_public_key=None)(context)
    mapped = simulation_resolver(
        cfg, output_dir=tmp_path, coordinator_public_key=None, data_dir=root
    )(context)
    assert plain.site_id == mapped.site_id == "site-01"
    np.testing.assert_array_equal(plain.data.train.x, mapped.data.train.x)
    np.testing.assert_array_equal(plain.data.test.y, mapped.data.test.y)
