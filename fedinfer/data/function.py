"""A user's data function (``dataset=function dataset._target_=my_pkg.data.load_site``).

Contract: ``load_site(site_id: str, split: str) -> torch.utils.data.Dataset``, called with
keywords, ``split`` one of ``train``, ``val``, ``test``. The dataset must be indexable
(``__len__`` and ``__getitem__``; an ``IterableDataset`` cannot be Poisson-sampled) and
``dataset[i]`` is ``(features, label)``: any array-like features of one shape, and the
label of ``task.kind``: an integer class (multiclass, binary), a float target or vector of
targets (regression), or a 0/1 label vector (multilabel). Labels are taken from a
``targets`` or ``labels`` attribute when the dataset has one (torchvision's convention),
else read once by iterating the dataset.

A site imports the function only when its own allow-list names it:
``$FEDINFER_DATA_TARGETS``, comma-separated exact targets or ``package.prefix.*`` entries,
exactly as ``$FEDINFER_MODEL_TARGETS`` guards model code. The site decides which records
train: in a deployment the target comes from the site (``fedinfer site --data
py:my_pkg.data.load_site``), never from the coordinator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedinfer.data.lazy import LazyDataset, task_labels
from fedinfer.errors import ConfigError, DataError
from fedinfer.targets import DATA_TARGETS

__all__ = [
    "DATA_ALLOW_ENV",
    "SPLITS",
    "TorchSource",
    "allow_data_target",
    "check_data_target_allowed",
    "load_function_split",
]

DATA_ALLOW_ENV = DATA_TARGETS.env_var
SPLITS = ("train", "val", "test")


def allow_data_target(target: str) -> None:
    """Add ``target`` to this process's allow-list (a simulation: its config is the sites')."""
    DATA_TARGETS.allow(target)


def check_data_target_allowed(target: str) -> None:
    """Raise :class:`ConfigError` unless ``$FEDINFER_DATA_TARGETS`` names ``target``."""
    DATA_TARGETS.check(target)


def _import(target: str) -> Callable[..., Any]:
    return DATA_TARGETS.load(target)


class TorchSource:
    """A user's indexable torch Dataset as a :class:`~fedinfer.data.lazy.SampleSource`."""

    def __init__(self, dataset: Any, *, where: str) -> None:
        self.dataset = dataset
        self.where = where
        self.sample_shape = tuple(self.read(0).shape) if len(dataset) else (0,)

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> np.ndarray:  # noqa: D102
        item = self.dataset[index]
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise DataError(f"{self.where}[{index}] must be (features, label), got {type(item)}")
        x = item[0]
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.dtype == object:
            raise DataError(f"{self.where}[{index}] features are not numeric")
        x = x.astype(np.float32, copy=False)
        if hasattr(self, "sample_shape") and x.shape != self.sample_shape:
            raise DataError(
                f"{self.where}[{index}] has shape {list(x.shape)} but sample 0 has "
                f"{list(self.sample_shape)}; every sample must have the same shape"
            )
        return x


def load_function_split(
    target: str,
    *,
    site_id: str,
    split: str,
    num_classes: int | None = None,
    task: str = "multiclass",
) -> LazyDataset:
    """Call the allow-listed ``target`` for one site and split; wrap the result lazily.

    Labels are read for ``task`` (:func:`fedinfer.data.lazy.task_labels`).

    Raises
    ------
    ConfigError
        The target is off the allow-list or cannot be imported.
    DataError
        It did not return an indexable dataset of ``(features, label)`` pairs.
    """
    fn = _import(target)
    where = f"{target}(site_id={site_id!r}, split={split!r})"
    try:
        dataset = fn(site_id=site_id, split=split)
    except (ConfigError, DataError):
        raise
    except Exception as exc:  # the user's code may raise anything
        raise DataError(f"{where} failed: {' '.join(str(exc).split())}") from None
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise DataError(
            f"{where} returned {type(dataset).__name__}, not an indexable torch Dataset "
            "(__len__ and __getitem__; an IterableDataset cannot be Poisson-sampled for DP)"
        )
    source = TorchSource(dataset, where=where)
    labels = _labels(dataset, source, where, classes=task in ("multiclass", "binary"))
    if len(labels):
        ids, found, _ = task_labels(labels, task, where=where)
    else:
        ids, found = labels, 2
    if task in ("multiclass", "binary"):
        classes = num_classes or getattr(dataset, "num_classes", None) or found
    else:  # the width of the targets / label rows is the data's own
        if num_classes is not None and len(labels) and found != num_classes:
            raise DataError(
                f"{where} has {found} {'labels' if task == 'multilabel' else 'targets'} per "
                f"sample but the federation has {num_classes}"
            )
        classes = found if len(labels) else (num_classes or 1)
    return LazyDataset(source, np.arange(len(source)), ids, int(classes))


def _labels(dataset: Any, source: TorchSource, where: str, *, classes: bool) -> np.ndarray:
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if values is not None and len(values) == len(dataset):
            return _as_array(values)
    if classes:
        return np.asarray([_label(dataset[i][1]) for i in range(len(source))], dtype=np.int64)
    rows = [_as_array(dataset[i][1]) for i in range(len(source))]
    return np.stack(rows) if rows else np.empty((0,), dtype=np.float32)


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _label(value: Any) -> int:
    return int(value.item() if isinstance(value, torch.Tensor | np.ndarray) else value)
