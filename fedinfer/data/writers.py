"""Write in-memory samples in the on-disk layouts :mod:`fedinfer.data.lazy` reads.

For examples, tests and ``fedinfer deploy local``: a real user's data already lies on disk.
Samples are written plainly (no fsync per file: thousands of small files); shards atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fedinfer.data.datasets import ArrayDataset
from fedinfer.fsutil import atomic_write_bytes

__all__ = ["write_folder", "write_shards"]


def write_folder(
    data: ArrayDataset, root: Path, *, sample_shape: tuple[int, ...], suffix: str = ".npy"
) -> Path:
    """Write one file per sample under ``root/<label>/``; return ``root``.

    ``.npy`` keeps float32 values exactly; ``.png`` writes 8-bit images of values in [0, 1]
    (``sample_shape`` ``(1, H, W)`` grey or ``(3, H, W)`` RGB).

    Examples
    --------
    >>> write_folder(load_dataset(DatasetConfig(name="digits"), seed=0), Path("digits"),
    ...              sample_shape=(1, 8, 8), suffix=".png")  # doctest: +SKIP
    """
    root = Path(root)
    for i, (x, y) in enumerate(zip(data.x, data.y, strict=True)):
        folder = root / str(int(y))
        folder.mkdir(parents=True, exist_ok=True)
        sample = np.asarray(x, dtype=np.float32).reshape(sample_shape)
        path = folder / f"{i:07d}{suffix}"
        if suffix == ".png":
            _write_png(path, sample)
        else:
            np.save(path, sample)
    return root


def _write_png(path: Path, sample: np.ndarray) -> None:
    from PIL import Image

    pixels = np.clip(np.rint(sample * 255.0), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def write_shards(
    data: ArrayDataset,
    root: Path,
    *,
    rows_per_shard: int,
    sample_shape: tuple[int, ...] | None = None,
    compressed: bool = False,
) -> Path:
    """Write ``data`` as NPZ shards ``root/shard-00000.npz`` ... (arrays ``x``, ``y``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shape = sample_shape or (data.input_dim,)
    save = np.savez_compressed if compressed else np.savez
    for k, start in enumerate(range(0, len(data), rows_per_shard)):
        x = data.x[start : start + rows_per_shard].reshape(-1, *shape)
        buffer = io.BytesIO()
        save(buffer, x=x, y=data.y[start : start + rows_per_shard])
        atomic_write_bytes(root / f"shard-{k:05d}.npz", buffer.getvalue())
    return root
