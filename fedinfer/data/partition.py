"""Partitioners: split one pooled dataset across sites, deterministically by seed."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedinfer.config.schema import PartitionConfig
from fedinfer.errors import ConfigError, DataError

__all__ = ["PARTITION_NAMES", "partition_indices"]

_MAX_DIRICHLET_TRIES = 100


def _iid(
    labels: np.ndarray, num_sites: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(len(labels)), num_sites))


def _dirichlet(
    labels: np.ndarray, num_sites: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over sites by proportions ~ Dir(alpha).

    Draws are repeated (same RNG stream, so still deterministic) until every
    site holds at least ``min_samples_per_site`` samples.
    """
    classes = np.unique(labels)
    for _ in range(_MAX_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_sites, cfg.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= cfg.min_samples_per_site:
            return [rng.permutation(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"`partition.alpha`={cfg.alpha} with {num_sites} sites leaves some site with fewer than "
        f"`partition.min_samples_per_site`={cfg.min_samples_per_site} samples after "
        f"{_MAX_DIRICHLET_TRIES} draws; raise partition.alpha, lower the site count, "
        "or use more samples"
    )


def _shards(
    labels: np.ndarray, num_sites: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID split: sort by label, cut into shards, deal each site a few shards."""
    num_shards = num_sites * cfg.labels_per_site
    order = np.argsort(
        labels + rng.random(len(labels)) * 0.5, kind="stable"
    )  # shuffle within a label
    shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards)
    return [
        np.concatenate(
            [shards[s] for s in dealt[i * cfg.labels_per_site : (i + 1) * cfg.labels_per_site]]
        )
        for i in range(num_sites)
    ]


_PARTITIONERS: dict[
    str, Callable[[np.ndarray, int, PartitionConfig, np.random.Generator], list[np.ndarray]]
] = {
    "dirichlet": _dirichlet,
    "iid": _iid,
    "shards": _shards,
}
PARTITION_NAMES: tuple[str, ...] = tuple(sorted(_PARTITIONERS))


def partition_indices(
    labels: np.ndarray, *, num_sites: int, cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Split sample indices across ``num_sites`` sites.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer label of every sample.
    num_sites : int
        Number of sites.
    cfg : PartitionConfig
        The ``partition`` config group (``iid``, ``dirichlet`` or ``shards``).
    seed : int
        The same seed always gives the same split.

    Returns
    -------
    list of numpy.ndarray
        One int64 index array per site; disjoint, each non-empty.

    Examples
    --------
    >>> parts = partition_indices(np.arange(100) % 10, num_sites=4,
    ...                           cfg=PartitionConfig(name="iid"), seed=0)
    >>> [len(p) for p in parts]
    [25, 25, 25, 25]
    """
    partitioner = _PARTITIONERS.get(cfg.name)
    if partitioner is None:
        raise ConfigError(
            f"`partition.name` is {cfg.name!r}; choose one of {', '.join(PARTITION_NAMES)}"
        )
    needed = num_sites * max(cfg.min_samples_per_site, 1)
    if len(labels) < needed:
        raise ConfigError(
            f"`federation.num_sites`={num_sites} needs at least {needed} samples "
            f"({cfg.min_samples_per_site} per site) but the dataset has {len(labels)}; "
            "use fewer sites or more samples (e.g. dataset.num_samples)"
        )
    rng = np.random.default_rng(seed)
    parts = partitioner(labels, num_sites, cfg, rng)
    if min(len(p) for p in parts) == 0:
        raise DataError(f"partition {cfg.name!r} left a site without samples; use fewer sites")
    return [np.asarray(p, dtype=np.int64) for p in parts]
