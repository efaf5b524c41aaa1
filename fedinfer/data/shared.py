"""Site data written once per simulation and memory-mapped by every Ray actor.

Without this, every actor process rebuilds the pooled dataset and all partitions (from the
on-disk cache) and keeps them in its own memory: at 1,000 sites and a few actors that is a copy
of the whole federation per actor. Here the driver writes each split of every site once, as
concatenated ``.npy`` files in the run directory, and an actor opens them with
``mmap_mode="r"``: the operating system shares the pages between processes and an actor reads
only the rows of the site it is running.

Layout of ``<run dir>/site_data/``::

    index.json                      # sites, num_classes, row offsets per split
    train_x.npy  train_y.npy        # every site's training rows, site after site
    val_x.npy    val_y.npy
    test_x.npy   test_y.npy
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from fedinfer.data.datasets import ArrayDataset
from fedinfer.data.federated import FederatedData, SiteData
from fedinfer.errors import DataError

__all__ = ["SPLITS", "open_site", "write_shared_sites"]

SPLITS = ("train", "val", "test")
_INDEX = "index.json"


def write_shared_sites(data: FederatedData, root: Path) -> Path:
    """Write every site's splits under ``root`` once; return ``root``.

    Parameters
    ----------
    data : FederatedData
        The federation built by :func:`fedinfer.data.build_federated_data`.
    root : pathlib.Path
        A directory of the run (created; existing files are replaced).

    Examples
    --------
    >>> data = build_federated_data(cfg)  # doctest: +SKIP
    >>> root = write_shared_sites(data, run_dir / "site_data")  # doctest: +SKIP
    >>> open_site(root, 3).site_id  # doctest: +SKIP
    'site-03'
    """
    if data.lazy:  # copying an on-disk dataset into the run would read all of it
        raise DataError("on-disk datasets are read lazily by every actor; nothing to share")
    root.mkdir(parents=True, exist_ok=True)
    offsets: dict[str, list[int]] = {}
    for split in SPLITS:
        parts = [getattr(site, split) for site in data.sites]
        offsets[split] = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).tolist()
        np.save(root / f"{split}_x.npy", np.concatenate([p.x for p in parts]).astype(np.float32))
        # int64 class ids, or float32 targets / label vectors (fedinfer.tasks): kept as they are
        np.save(root / f"{split}_y.npy", np.concatenate([p.y for p in parts]))
    index = {
        "sites": [site.site_id for site in data.sites],
        "num_classes": data.num_classes,
        "offsets": offsets,
    }
    (root / _INDEX).write_text(json.dumps(index))  # written last: its presence means complete
    return root


def open_site(root: Path, index: int) -> SiteData:
    """Site ``index``'s splits, read from the memory-mapped files under ``root``.

    Only this site's rows are read; they are copied out of the mapping (a site's working set),
    so training never holds a read-only view of the shared files.
    """
    meta, arrays = _open(str(root))
    sites: list[str] = meta["sites"]
    if not 0 <= index < len(sites):
        raise DataError(f"site index {index} is outside the {len(sites)} sites under {root}")
    splits = {}
    for split in SPLITS:
        start, stop = meta["offsets"][split][index], meta["offsets"][split][index + 1]
        x, y = arrays[split]
        splits[split] = ArrayDataset(
            np.array(x[start:stop]), np.array(y[start:stop]), int(meta["num_classes"])
        )
    return SiteData(sites[index], splits["train"], splits["val"], splits["test"])


@functools.lru_cache(maxsize=4)
def _open(root: str) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Map the files once per process (the mapping, not the data, is cached)."""
    path = Path(root)
    try:
        meta = json.loads((path / _INDEX).read_text())
    except FileNotFoundError as exc:
        raise DataError(f"no shared site data under {path}: {_INDEX} is missing") from exc
    arrays = {
        split: (
            np.load(path / f"{split}_x.npy", mmap_mode="r", allow_pickle=False),
            np.load(path / f"{split}_y.npy", mmap_mode="r", allow_pickle=False),
        )
        for split in SPLITS
    }
    return meta, arrays
