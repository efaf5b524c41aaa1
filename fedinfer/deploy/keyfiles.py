"""Writing key material to disk: private files are created 0600, never chmod-ed afterwards.

A file created with a permissive mode and tightened later is readable by others
for a moment; ``os.open(..., 0o600)`` under ``O_EXCL`` closes that window.
"""

from __future__ import annotations

from pathlib import Path

from fedinfer.errors import ConfigError
from fedinfer.fsutil import atomic_write_bytes

__all__ = ["write_private", "write_public"]


def write_private(path: Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to a new file readable by the owner only (0600).

    Parameters
    ----------
    path : Path
        Destination; its parent is created 0700 if missing.
    data : bytes
        The private key or secret.
    overwrite : bool
        Replace an existing file atomically (default: False, refuse to clobber a key).

    Raises
    ------
    ConfigError
        ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; refusing to overwrite a private key")
    return atomic_write_bytes(path, data)  # its temporary file is created 0600


def write_public(path: Path, data: bytes) -> Path:
    """Write a certificate or public key (0644), replacing any previous file atomically."""
    return atomic_write_bytes(Path(path), data, mode=0o644)
