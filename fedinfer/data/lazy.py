"""Data that does not fit in memory: samples read from disk one at a time, by index.

A :class:`LazyDataset` holds only what partitioning and privacy accounting need in
memory (its length and the labels: one integer class per sample, a float32 regression
target (or row of targets), or a uint8 0/1 multi-label row) and reads the features of a
sample when it is asked for it, in the training process or in DataLoader workers
(``dataset.num_workers``). It is an indexable ``torch.utils.data.Dataset``, so DP-SGD's
Poisson sampler draws from it like from an in-memory one, and ``len(dataset)`` is exact,
so the sample rate charged to the ledger is exactly ``batch_size / len(dataset)``.

Sources of samples (each a :class:`SampleSource`)::

    <dir>/<class>/<sample>.png|.npy    FileSource: one file per sample, label = class folder
    <dir>/*.npz  or  <dir>/*.parquet   ShardSource: shards of rows; uncompressed NPZ members
                                       are memory-mapped, others cached a shard at a time
    load_site(site_id, split)          TorchSource: a user's torch Dataset (fedinfer.data.function)

Nothing is ever unpickled: NPY/NPZ files are opened with ``allow_pickle=False`` and
object arrays are refused.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedinfer.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ConcatSource",
    "FileSource",
    "LazyDataset",
    "SampleSource",
    "ShardSource",
    "labels_to_ids",
    "open_data_dir",
    "open_folder",
    "open_shards",
    "task_labels",
    "worker_count",
]

IMAGE_SUFFIXES = (".png",)
ARRAY_SUFFIXES = (".npy",)
SHARD_SUFFIXES = (".npz", ".parquet", ".pq")
logger = logging.getLogger(__name__)

_SHARD_CACHE = 2  # shards a process keeps decoded (compressed NPZ, Parquet)
_MAP_CACHE = 64  # memory-mapped shards a process keeps open (costs address space, not memory)


class SampleSource(Protocol):
    """Reads one sample's features by position; knows how many there are and their shape."""

    sample_shape: tuple[int, ...]

    def __len__(self) -> int: ...  # noqa: D105

    def read(self, index: int) -> np.ndarray:
        """Sample ``index``'s features as float32 of shape :attr:`sample_shape`."""
        ...


class LazyDataset:
    """Samples of a :class:`SampleSource` at ``indices``, read on access.

    A map-style dataset (``__len__`` and ``__getitem__``), as ``torch.utils.data.DataLoader``
    and Opacus' Poisson sampler take it; importing this module does not import torch.

    Parameters
    ----------
    source : SampleSource
        Where the features are read from.
    indices : numpy.ndarray
        Positions in ``source`` (int64); a subset composes them, never copying data.
    y : numpy.ndarray
        The label of each index, held in memory: int64 class ids ``(n,)`` (multiclass,
        binary), float32 targets ``(n,)`` or ``(n, k)`` (regression) or uint8 0/1 rows
        ``(n, k)`` (multilabel, 1 byte a label). A sample's label tensor is int64 for class
        ids and float32 otherwise, as the in-memory :class:`ArrayDataset` holds them.
    num_classes : int
        Size of the label space (classes, labels or regression targets).
    class_names : tuple of str or None
        The class names behind the ids when the data named its classes (folders ``cat``,
        ``dog``), numbered in sorted order; None when the labels were integers.

    Examples
    --------
    >>> data = open_folder(Path("images"))  # doctest: +SKIP
    >>> x, y = data[0]  # doctest: +SKIP
    ... # a flat float32 tensor of input_dim values and its label (int64 class id here)
    """

    def __init__(
        self,
        source: SampleSource,
        indices: np.ndarray,
        y: np.ndarray,
        num_classes: int,
        *,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        self.source = source
        self.class_names = class_names
        self.indices = np.asarray(indices, dtype=np.int64)
        self.y = _label_array(y)
        self.num_classes = int(num_classes)
        self.sample_shape = tuple(int(d) for d in source.sample_shape)
        if len(self.indices) != len(self.y):
            raise ValueError("one label per index")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        x = self.read(int(i)).reshape(-1)
        return torch.from_numpy(x), torch.from_numpy(np.asarray(self._label_rows(self.y[i])))

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch at once (DataLoader's batched fetch): one gather per shard, not per row."""
        import torch

        if not len(positions):
            return []
        at = np.asarray(positions, dtype=np.int64)
        x = torch.from_numpy(self.read_many(at).reshape(len(at), -1))
        y = torch.from_numpy(self._label_rows(self.y[at]))
        return list(zip(x.unbind(0), y.unbind(0), strict=True))

    def _label_rows(self, y: np.ndarray) -> np.ndarray:
        """Labels as training takes them: class ids int64, targets and 0/1 rows float32."""
        return np.asarray(y, dtype=np.int64 if self.is_class_ids else np.float32)

    @property
    def is_class_ids(self) -> bool:
        """Whether the labels are one integer class per sample (multiclass, binary)."""
        return bool(self.y.ndim == 1 and np.issubdtype(self.y.dtype, np.integer))

    def read(self, i: int) -> np.ndarray:
        """Sample ``i``'s features in their natural shape (a :class:`SampleSource` itself)."""
        return self.source.read(int(self.indices[i]))

    def read_many(self, positions: np.ndarray) -> np.ndarray:
        """Features of several samples, ``(n, *sample_shape)`` float32."""
        at = self.indices[np.asarray(positions, dtype=np.int64)]
        many = getattr(self.source, "read_many", None)
        if many is not None:
            return np.asarray(many(at), dtype=np.float32)
        out = np.empty((len(at), *self.sample_shape), dtype=np.float32)
        for row, index in enumerate(at):
            out[row] = self.source.read(int(index))
        return out

    @property
    def input_dim(self) -> int:
        """Number of features per sample (the product of :attr:`sample_shape`)."""
        return math.prod(self.sample_shape)

    @property
    def x(self) -> LazyRows:
        """The features as a lazy ``(n, input_dim)`` array: ``data.x[a:b]`` reads those rows."""
        return LazyRows(self)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Flat float32 features of samples ``start:stop``, shape ``(n, input_dim)``."""
        positions = np.arange(start, min(stop, len(self)))
        return self.read_many(positions).reshape(len(positions), self.input_dim)

    def subset(self, indices: np.ndarray) -> LazyDataset:
        """The samples at ``indices`` (positions in this dataset); nothing is read."""
        idx = np.asarray(indices, dtype=np.int64)
        return LazyDataset(
            self.source, self.indices[idx], self.y[idx], self.num_classes,
            class_names=self.class_names,
        )  # fmt: skip

    def with_num_classes(self, num_classes: int) -> LazyDataset:
        """The same samples, labelled as one of ``num_classes`` classes."""
        return LazyDataset(
            self.source, self.indices, self.y, num_classes, class_names=self.class_names
        )


class LazyRows:
    """Row access to a :class:`LazyDataset` that reads only the rows asked for.

    Code written for in-memory arrays (``data.x[:32]``) keeps working; ``numpy.asarray``
    reads every row.
    """

    def __init__(self, data: LazyDataset) -> None:
        self._data = data

    @property
    def shape(self) -> tuple[int, int]:  # noqa: D102
        return (len(self._data), self._data.input_dim)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self._data))
            if step == 1:
                return self._data.rows(start, stop)
            key = np.arange(start, stop, step)
        if isinstance(key, int | np.integer):
            return self._data.read(int(key)).reshape(-1)
        rows = [self._data.read(int(i)).reshape(-1) for i in np.asarray(key).reshape(-1)]
        return np.stack(rows) if rows else np.empty((0, self._data.input_dim), np.float32)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = self._data.rows(0, len(self._data))
        return rows if dtype is None else rows.astype(dtype)


def _label_array(y: np.ndarray) -> np.ndarray:
    """Labels kept small: class ids int64, 0/1 label rows uint8, regression targets float32."""
    y = np.asarray(y)
    if y.ndim == 1 and (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        return y.astype(np.int64, copy=False)
    if y.dtype in (np.uint8, np.float32):
        return y
    return y.astype(np.float32)


def task_labels(
    labels: np.ndarray, task: str, *, where: str
) -> tuple[np.ndarray, int, tuple[str, ...] | None]:
    """Raw labels read for ``task.kind``: class ids, regression targets or 0/1 label rows.

    Returns the labels as :class:`LazyDataset` keeps them, the size of the label space and
    the class names (named classes only). The checks are :func:`fedinfer.tasks.prepare_labels`.
    """
    if task in ("multiclass", "binary"):  # class ids as before (binary checked by the task)
        if labels.ndim != 1:
            raise DataError(
                f"{where}: labels have shape {list(labels.shape[1:])} per sample; "
                f"task.kind={task} needs one class per sample (task=multilabel or "
                "task=regression take 2-D labels)"
            )
        return labels_to_ids(labels, where=where)
    from fedinfer.tasks import prepare_labels

    if len(labels) == 0:
        raise DataError(f"{where!r} holds no samples")
    y, size = prepare_labels(labels, task, where=where)
    return (y.astype(np.uint8) if task == "multilabel" else y), size, None


def worker_count(requested: int) -> int:
    """DataLoader workers to start for ``dataset.num_workers``: never more than the cores.

    The number comes from the run config, which a coordinator writes; a site caps it.
    """
    return min(max(int(requested), 0), os.cpu_count() or 1)


class ConcatSource:
    """Several sources of one sample shape, one after the other (a pooled test split)."""

    def __init__(self, sources: Sequence[SampleSource]) -> None:
        shapes = {tuple(s.sample_shape) for s in sources}
        if len(shapes) != 1:
            raise DataError(f"the sites' samples have different shapes: {sorted(shapes)}")
        self.sources = list(sources)
        self.sample_shape = shapes.pop()
        self.offsets = np.cumsum([0, *(len(s) for s in sources)]).tolist()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, index: int) -> np.ndarray:  # noqa: D102
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.sources[k].read(index - self.offsets[k])


# ---------------------------------------------------------------------------------------------
# One file per sample, in a folder per class
# ---------------------------------------------------------------------------------------------


class FileSource:
    """One ``.png`` or ``.npy`` file per sample; every file must have ``sample_shape``."""

    def __init__(self, paths: Sequence[Path], sample_shape: tuple[int, ...]) -> None:
        self.paths = [Path(p) for p in paths]
        self.sample_shape = tuple(sample_shape)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:  # noqa: D102
        path = self.paths[index]
        x = _read_png(path) if path.suffix.lower() in IMAGE_SUFFIXES else _read_npy(path)
        if x.shape != self.sample_shape:
            raise DataError(
                f"{str(path)!r} holds a sample of shape {list(x.shape)}, but the dataset's "
                f"samples are {list(self.sample_shape)}; give every sample the same shape"
            )
        return x


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        scale = 65535.0 if image.mode.startswith("I") else 255.0  # 16-bit grey, else 8-bit
        pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[None]  # grey (H, W) -> (1, H, W)
    else:
        pixels = pixels.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W), as torch convolutions take
    return np.ascontiguousarray(pixels / scale, dtype=np.float32)


def _read_npy(path: Path) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle: refused
        raise DataError(f"{str(path)!r} cannot be read without unpickling: {exc}") from None
    return np.asarray(x, dtype=np.float32)


def _png_shape(path: Path) -> tuple[int, ...]:
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
            channels = len(image.getbands())
    except OSError as exc:
        raise DataError(f"{str(path)!r} is not a readable PNG image: {exc}") from None
    return (channels, height, width)


def _npy_shape(path: Path) -> tuple[int, ...]:
    try:
        with open(path, "rb") as fh:
            shape, dtype = _npy_header(fh, path)
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from None
    return shape


def _npy_header(fh: Any, where: Path | str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from an NPY header; object dtypes (pickles) are refused."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    except ValueError as exc:
        raise DataError(f"{str(where)!r} is not an NPY array: {exc}") from None
    if dtype.hasobject:
        raise DataError(
            f"{str(where)!r} holds Python objects (a pickle), which fedinfer never loads; "
            "save numeric arrays"
        )
    return tuple(int(d) for d in shape), dtype


def _sample_shape(path: Path) -> tuple[int, ...]:
    return _png_shape(path) if path.suffix.lower() in IMAGE_SUFFIXES else _npy_shape(path)


def open_folder(root: Path) -> LazyDataset:
    """Index an image-folder dataset: ``root/<class>/<sample>.png|.npy``; reads headers only.

    Class folders named by integers (``0``, ``1`` ...) are those class ids, so sites that
    lack a class still agree on the ids; other names are numbered in sorted order.

    Raises
    ------
    DataError
        A missing directory, no class folders, an empty class folder, or a sample whose
        shape differs from the others (naming the file).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"`dataset.path` {str(root)!r} is not a directory; point it at <dir>/<class>/<files>"
        )
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"{str(root)!r} holds no class folders; lay samples out as {root}/<class>/<file>.png"
        )
    suffixes = IMAGE_SUFFIXES + ARRAY_SUFFIXES
    paths: list[Path] = []
    labels: list[str] = []
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
        if not files:
            raise DataError(
                f"class folder {str(folder)!r} holds no .png or .npy samples; "
                "add samples or remove the folder"
            )
        paths += files
        labels += [folder.name] * len(files)
    shape = _check_shapes(paths)
    ids, num_classes, names = labels_to_ids(np.asarray(labels), where=str(root))
    source = FileSource(paths, shape)
    return LazyDataset(source, np.arange(len(paths)), ids, num_classes, class_names=names)


def _check_shapes(paths: Sequence[Path]) -> tuple[int, ...]:
    """Every sample's shape from its header (no pixel is decoded); one shape or an error."""
    first = _sample_shape(paths[0])
    for path in paths[1:]:
        shape = _sample_shape(path)
        if shape != first:
            raise DataError(
                f"{str(path)!r} has shape {list(shape)} but {str(paths[0])!r} has "
                f"{list(first)}; every sample must have the same shape"
            )
    return first


def labels_to_ids(
    labels: np.ndarray, *, where: str
) -> tuple[np.ndarray, int, tuple[str, ...] | None]:
    """Integer labels (or integer-named classes) kept as ids; anything else numbered sorted.

    Returns the ids, the class count, and the class names when they were not integers (None
    otherwise): sites that number named classes independently may disagree on the ids.
    """
    if len(labels) == 0:
        raise DataError(f"{where!r} holds no samples")
    numeric = np.issubdtype(labels.dtype, np.number)
    if numeric and np.all(np.mod(labels, 1) == 0) and labels.min() >= 0:
        ids = labels.astype(np.int64)
    elif not numeric and all(str(t).isdigit() for t in labels):
        ids = labels.astype(str).astype(np.int64)
    else:
        classes, inverse = np.unique(labels.astype(str), return_inverse=True)
        names = tuple(str(c) for c in classes)
        return inverse.astype(np.int64), max(len(classes), 2), names
    return ids, max(int(ids.max()) + 1, 2), None


# ---------------------------------------------------------------------------------------------
# Shards of rows: NPZ (x, y) or Parquet (feature columns + a label column)
# ---------------------------------------------------------------------------------------------


class ShardSource:
    """Rows spread over shard files; a row is read from its shard, never the whole set.

    Uncompressed NPZ members (``np.savez``) are memory-mapped (the last :data:`_MAP_CACHE`
    shards stay mapped), so any row is a page read. Compressed NPZ (``np.savez_compressed``)
    and Parquet shards are decoded whole on first use and kept (the last :data:`_SHARD_CACHE`
    per process): Poisson batches across many such shards re-decode them, so prefer
    uncompressed NPZ for large data.
    """

    def __init__(
        self, shards: Sequence[Path], lengths: Sequence[int], sample_shape: tuple[int, ...],
        *, x_key: str, columns: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        self.shards = [Path(p) for p in shards]
        self.offsets = np.cumsum([0, *lengths]).tolist()
        self.sample_shape = tuple(sample_shape)
        self.x_key = x_key
        self.columns = list(columns) if columns is not None else None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # workers start with empty caches
        return {**self.__dict__, "_cache": OrderedDict(), "_maps": OrderedDict()}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, index: int) -> np.ndarray:  # noqa: D102
        k = bisect.bisect_right(self.offsets, index) - 1
        return np.array(self._shard(k)[index - self.offsets[k]], dtype=np.float32)  # a copy

    def read_many(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` in that order: one sorted gather per shard touched."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *self.sample_shape), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            local = indices[where] - self.offsets[k]
            order = np.argsort(local, kind="stable")  # ascending offsets: sequential page reads
            out[where[order]] = self._shard(int(k))[local[order]]
        return out

    def _shard(self, k: int) -> np.ndarray:
        for cache in (self._maps, self._cache):
            if k in cache:
                cache.move_to_end(k)
                return cache[k]
        path = self.shards[k]
        x = _npz_memmap(path, self.x_key) if path.suffix.lower() == ".npz" else None
        if x is not None:
            cache, limit = self._maps, _MAP_CACHE
        else:
            cache, limit = self._cache, _SHARD_CACHE
            if path.suffix.lower() == ".npz":
                with np.load(path, allow_pickle=False) as arrays:
                    x = np.asarray(arrays[self.x_key], dtype=np.float32)
            else:
                x = _read_parquet(path, self.columns or [])
        cache[k] = x
        while len(cache) > limit:
            cache.popitem(last=False)
        return x


def _npz_memmap(path: Path, key: str) -> np.ndarray | None:
    """Memory-map an uncompressed NPZ member; None when it is compressed."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)  # the member's local header: its name and extra field follow
        if local[:4] != b"PK\x03\x04":
            raise DataError(f"{str(path)!r} is not a valid NPZ (zip) file")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        shape, dtype = _npy_header(fh, f"{path}:{key}")
        offset = fh.tell()
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _read_parquet(path: Path, columns: list[str]) -> np.ndarray:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=columns)
    return np.column_stack([table.column(c).to_numpy() for c in columns]).astype(np.float32)


def open_shards(
    root: Path, *, label_column: str = "label", task: str = "multiclass"
) -> LazyDataset:
    """Index a directory of NPZ or Parquet shards; reads labels and headers, not features.

    An NPZ shard holds ``x`` of shape ``(rows, *sample_shape)`` and ``y`` (or
    ``label_column``); a Parquet shard holds numeric feature columns and ``label_column``
    (``a,b,c`` names several: 0/1 labels for ``task=multilabel`` or several regression
    targets). Labels are read for ``task`` (:func:`task_labels`): a 2-D NPZ ``y`` is a
    multi-label matrix or several targets.

    Raises
    ------
    DataError
        A missing or empty directory, mixed shard kinds, a shard without labels, or shards
        whose samples have different shapes (naming the shard).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"`dataset.path` {str(root)!r} is not a directory; point it at a directory of "
            "NPZ or Parquet shards"
        )
    shards = sorted(p for p in root.iterdir() if p.suffix.lower() in SHARD_SUFFIXES)
    if not shards:
        raise DataError(f"{str(root)!r} holds no .npz or .parquet shards")
    kinds = {p.suffix.lower() == ".npz" for p in shards}
    if len(kinds) > 1:
        raise DataError(f"{str(root)!r} mixes NPZ and Parquet shards; use one kind")
    if kinds.pop():
        return _open_npz_shards(root, shards, label_column, task)
    return _open_parquet_shards(root, shards, label_column, task)


def _open_npz_shards(
    root: Path, shards: list[Path], label_column: str, task: str
) -> LazyDataset:
    lengths, labels, shape, compressed = [], [], None, 0
    for path in shards:
        x_shape, y, packed = _npz_index(path, label_column)
        compressed += packed
        if shape is None:
            shape, first = x_shape[1:], path
        elif x_shape[1:] != shape:
            raise DataError(
                f"shard {str(path)!r} has samples of shape {list(x_shape[1:])} but "
                f"{str(first)!r} has {list(shape)}; every shard must have the same shape"
            )
        lengths.append(x_shape[0])
        labels.append(y)
    assert shape is not None
    _warn_decoded(root, compressed, "compressed NPZ")
    ids, num_classes, names = task_labels(np.concatenate(labels), task, where=str(root))
    source = ShardSource(shards, lengths, shape, x_key="x")
    return LazyDataset(source, np.arange(len(source)), ids, num_classes, class_names=names)


def _warn_decoded(root: Path, count: int, kind: str) -> None:
    """Poisson batches touch every shard; more decoded shards than the cache re-decode often."""
    if count > _SHARD_CACHE:
        logger.warning(
            "%s holds %d %s shards: each is decoded whole when a batch needs a row of it, and "
            "random (Poisson) batches touch them all; save shards with numpy.savez "
            "(uncompressed, memory-mapped) for fast lazy reads",
            root, count, kind,
        )  # fmt: skip


def _npz_index(path: Path, label_column: str) -> tuple[tuple[int, ...], np.ndarray, bool]:
    """``x``'s shape (from its header), the labels and whether ``x`` is compressed."""
    try:
        with zipfile.ZipFile(path) as archive, np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays.files:
                raise DataError(f"shard {str(path)!r} has no `x` array (arrays: {arrays.files})")
            label_key = "y" if "y" in arrays.files else label_column
            if label_key not in arrays.files:
                raise DataError(
                    f"shard {str(path)!r} has no `y` or `{label_column}` array; "
                    "set dataset.label_column to the label array's name"
                )
            with archive.open("x.npy") as fh:
                shape, _ = _npy_header(fh, f"{path}:x")
            packed = archive.getinfo("x.npy").compress_type != zipfile.ZIP_STORED
            y = arrays[label_key]
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"cannot read shard {str(path)!r}: {exc}") from None
    except ValueError as exc:  # an object array would need pickle
        raise DataError(f"shard {str(path)!r} cannot be read without unpickling: {exc}") from None
    if len(shape) < 1 or shape[0] != len(y):
        raise DataError(f"shard {str(path)!r}: `x` has {shape[:1]} rows but {len(y)} labels")
    return shape, np.asarray(y), packed


def _open_parquet_shards(
    root: Path, shards: list[Path], label_column: str, task: str
) -> LazyDataset:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [c.strip() for c in label_column.split(",") if c.strip()] or [label_column]
    lengths, labels, columns = [], [], None
    for path in shards:
        try:
            schema = pq.read_schema(path)
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"cannot read shard {str(path)!r}: {exc}") from None
        missing = [c for c in names if c not in schema.names]
        if missing:
            raise DataError(
                f"`dataset.label_column` {missing[0]!r} is not a column of shard "
                f"{str(path)!r}; columns are {schema.names[:20]}"
            )
        features = [n for n in schema.names if n not in names]
        if columns is None:
            columns, first = features, path
        elif features != columns:
            raise DataError(
                f"shard {str(path)!r} has {len(features)} feature columns but {str(first)!r} "
                f"has {len(columns)}; every shard must have the same columns"
            )
        lengths.append(rows)
        table = pq.read_table(path, columns=names)
        labels.append(
            table.column(0).to_numpy()
            if len(names) == 1
            else np.column_stack([table.column(c).to_numpy() for c in names])
        )
    assert columns is not None
    _warn_decoded(root, len(shards), "Parquet")
    ids, num_classes, classes = task_labels(np.concatenate(labels), task, where=str(root))
    source = ShardSource(shards, lengths, (len(columns),), x_key="", columns=columns)
    return LazyDataset(source, np.arange(len(source)), ids, num_classes, class_names=classes)


def open_data_dir(
    root: Path, *, label_column: str = "label", task: str = "multiclass"
) -> LazyDataset:
    """A site's data directory, whichever layout: class folders, or NPZ/Parquet shards.

    Class folders carry one class per sample: ``task.kind`` multilabel or regression needs
    shards (a one-line :class:`~fedinfer.errors.ConfigError` otherwise).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a directory")
    if any(p.suffix.lower() in SHARD_SUFFIXES for p in root.iterdir()):
        return open_shards(root, label_column=label_column, task=task)
    check_folder_task(task, str(root))
    return open_folder(root)


def check_folder_task(task: str, where: str) -> None:
    """Class folders hold one class per sample: refuse ``task.kind`` multilabel / regression."""
    if task not in ("multiclass", "binary"):
        raise ConfigError(
            f"`task.kind`={task}: class folders ({where}) carry one class per sample; give "
            "multi-label or regression targets as NPZ/Parquet shards (dataset=shards) or a "
            "data function"
        )
