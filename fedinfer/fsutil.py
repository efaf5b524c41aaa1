"""Crash-safe file writes shared by every part that persists state.

A reader (or a process restarted after a crash) sees the old file or the new
one, never half of one: write a temporary file in the same directory, fsync
it, ``os.replace`` it over the target, then fsync the directory so the rename
itself survives a power cut. Temporary files are created 0600 (``mkstemp``),
so secrets are never readable by others, not even briefly.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_directory"]


def fsync_directory(directory: Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically and durably; creates the parent directory.

    The file is 0600 unless ``mode`` says otherwise (e.g. 0o644 for a public key); the
    mode is set before the rename, so the file never appears with other permissions.

    Examples
    --------
    >>> atomic_write_bytes(Path("results.json"), b"{}")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path
