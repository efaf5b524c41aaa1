"""Ed25519 signing keys of the coordinator.

The coordinator signs every model artifact with its private key; sites hold
only the public key and verify offline. Keys are stored as PEM: the private
key unencrypted in PKCS#8 with file mode 0600 (created that way, never
chmod-ed after the fact, so it is never readable by others even briefly), the
public key as SubjectPublicKeyInfo.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedinfer.errors import ConfigError, ModelIntegrityError

__all__ = [
    "generate_signing_key",
    "key_fingerprint",
    "load_public_key",
    "load_signing_key",
    "save_public_key",
    "save_signing_key",
    "sign_bytes",
    "verify_bytes",
]


def generate_signing_key() -> Ed25519PrivateKey:
    """Return a fresh Ed25519 private key.

    Examples
    --------
    >>> key = generate_signing_key()
    >>> len(key_fingerprint(key.public_key()))
    32
    """
    return Ed25519PrivateKey.generate()


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """Short hex id of a public key: the first 16 bytes of SHA-256 over its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def save_signing_key(key: Ed25519PrivateKey, path: Path, *, overwrite: bool = False) -> Path:
    """Write ``key`` as unencrypted PKCS#8 PEM, readable by the owner only (0600).

    Parameters
    ----------
    key : Ed25519PrivateKey
        The coordinator's signing key.
    path : Path
        Destination file; its directory must exist.
    overwrite : bool
        Replace an existing file (default: False, an existing key is never clobbered).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"signing key file {path} already exists; pass overwrite=True or choose another path"
        ) from None
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # O_TRUNC on an existing file keeps its old mode
        fh.write(pem)
    return path


def save_public_key(key: Ed25519PrivateKey | Ed25519PublicKey, path: Path) -> Path:
    """Write the public half of ``key`` as PEM (SubjectPublicKeyInfo) and return ``path``."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    Path(path).write_bytes(pem)
    return Path(path)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key written by :func:`save_signing_key`."""
    try:
        key = serialization.load_pem_private_key(_read_key_file(path), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an Ed25519 private key PEM ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key written by :func:`save_public_key`."""
    try:
        key = serialization.load_pem_public_key(_read_key_file(path))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an Ed25519 public key PEM ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None


def sign_bytes(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of ``data``."""
    return key.sign(data)


def verify_bytes(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> None:
    """Raise :class:`ModelIntegrityError` unless ``signature`` over ``data`` verifies."""
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        raise ModelIntegrityError(
            "signature does not verify with the given public key "
            f"(fingerprint {key_fingerprint(public_key)})"
        ) from None
