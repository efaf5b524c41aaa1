"""Encryption at rest of a site's state with one 32-byte site key (ChaCha20-Poly1305).

Every sealed file (or record) has one versioned format::

    offset  size    field
    0       4       magic b"FIAR" (FedInfer At Rest)
    4       1       format version: 1 = ChaCha20-Poly1305, 96-bit random nonce
    5       8       key id: SHA-256(b"fedinfer-state-key-id/v1" || key)[:8]
    13      12      nonce (os.urandom)
    25      n + 16  ciphertext || Poly1305 tag

The associated data is the 25-byte header followed by the content's *logical
name* (``model-store/versions/7/weights.safetensors``, ``privacy-ledger``): a
sealed file moved to another place (another version, another part of the state)
fails authentication exactly like an edited one. The key id tells a wrong key
from a tampered file, so each gets its own error and fix.

The key file is one text line, ``fedinfer-state-key-v1 <base64 of 32 bytes>``
(``#`` comment lines allowed), created 0600 and refused when group or others
may read it. See ``docs/deployment.md`` ("Encryption at rest") for key handling.

Errors: a missing, wrong or unsafe key, or a plaintext file where a sealed one is
expected (and vice versa), is a :class:`~fedinfer.errors.StateKeyError`; a file
that fails authentication raises the error class its owner asks for
(``tampered=``), e.g. :class:`~fedinfer.errors.ModelIntegrityError` for a model.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedinfer.errors import FedInferError, StateKeyError
from fedinfer.fsutil import atomic_write_bytes

__all__ = [
    "ALGORITHM",
    "KEY_ENV_VAR",
    "MARKER_FILE",
    "StateKey",
    "check_state_dir",
    "is_sealed",
    "mark_state_dir",
    "open_state",
    "read_marker",
    "reseal_file",
    "resolve_state_key",
    "seal_state",
    "sealed_key_id",
]

ALGORITHM = "ChaCha20-Poly1305"
KEY_ENV_VAR = "FEDINFER_STATE_KEY_FILE"
MARKER_FILE = "at-rest.json"
MAGIC = b"FIAR"
FORMAT_VERSION = 1
KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12
HEADER_BYTES = len(MAGIC) + 1 + KEY_ID_BYTES + NONCE_BYTES
_KEY_PREFIX = "fedinfer-state-key-v1"
_ID_CONTEXT = b"fedinfer-state-key-id/v1"
_MARKER_FORMAT = "fedinfer-at-rest"
_FIX_MISSING = f"pass --state-key FILE (or set {KEY_ENV_VAR})"


class StateKey:
    """A site's 32-byte state key: seals and opens state files, derives sub-keys.

    Parameters
    ----------
    secret : bytes
        32 random bytes (:meth:`generate`, or :meth:`load` from a key file).
    path : Path or None
        Where it was loaded from, for messages only (default: None).

    Examples
    --------
    >>> key = StateKey.generate()
    >>> key.open(key.seal(b"ledger", name="privacy-ledger"), name="privacy-ledger")
    b'ledger'
    """

    def __init__(self, secret: bytes, *, path: Path | None = None) -> None:
        if len(secret) != KEY_BYTES:
            raise StateKeyError(f"a state key has {KEY_BYTES} bytes, not {len(secret)}")
        self._secret = bytes(secret)
        self._aead = ChaCha20Poly1305(self._secret)
        self.key_id = _key_id(self._secret)
        self.path = path

    def __repr__(self) -> str:  # never the secret
        return f"StateKey(key_id={self.key_id!r}, path={str(self.path) if self.path else None!r})"

    @property
    def label(self) -> str:
        """How messages name this key: its id and file."""
        return f"key id {self.key_id}" + (f" ({self.path})" if self.path else "")

    # ---------------------------------------------------------------- construction
    @classmethod
    def generate(cls) -> StateKey:
        """A fresh random key (``os.urandom``)."""
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def load(cls, path: Path) -> StateKey:
        """Read a key file written by :meth:`save`.

        Raises
        ------
        StateKeyError
            Missing, unreadable, readable by group/others, or not a state key file.
        """
        path = Path(path)
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise StateKeyError(
                f"state key file {path} does not exist; create one with "
                f"`fedinfer keys init-site-key {path}`"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise StateKeyError(f"cannot read state key file {path}: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StateKeyError(
                f"state key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):o}); `chmod 600 {path}`"
            )
        return cls(_parse_key_file(text, path), path=path)

    def save(self, path: Path) -> Path:
        """Write the key file (0600, atomically); refuses to overwrite an existing file."""
        path = Path(path)
        if path.exists():
            raise StateKeyError(
                f"{path} already exists; refusing to overwrite a state key "
                "(the state it encrypts would be lost): choose another path"
            )
        text = (
            f"# fedinfer site state key ({ALGORITHM}), key id {self.key_id}.\n"
            "# Keep it OUTSIDE the state directory and back it up offline: "
            "without it the state is lost.\n"
            f"{_KEY_PREFIX} {base64.b64encode(self._secret).decode('ascii')}\n"
        )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(path, text.encode("ascii"), mode=0o600)
        self.path = path
        return path

    # ------------------------------------------------------------------ sealing
    def seal(self, data: bytes, *, name: str) -> bytes:
        """Encrypt ``data`` for the logical place ``name`` (a fresh random nonce each time)."""
        header = (
            MAGIC + bytes([FORMAT_VERSION]) + bytes.fromhex(self.key_id) + os.urandom(NONCE_BYTES)
        )
        return header + self._aead.encrypt(header[-NONCE_BYTES:], data, _aad(header, name))

    def open(
        self,
        blob: bytes,
        *,
        name: str,
        source: Path | str = "<memory>",
        tampered: type[FedInferError] = FedInferError,
    ) -> bytes:
        """Decrypt a blob sealed for ``name``.

        Raises
        ------
        StateKeyError
            ``blob`` is plaintext, or sealed with another key.
        tampered
            ``blob`` fails authentication: edited, truncated, or sealed for another name.
        """
        if not is_sealed(blob):
            raise StateKeyError(
                f"{source} is not encrypted, but the state is expected to be (with {self.label}); "
                f"encrypt a plaintext state directory with `fedinfer keys encrypt-state DIR "
                "--state-key FILE`, or restore the file from a backup"
            )
        found = sealed_key_id(blob)
        if found != self.key_id:
            raise StateKeyError(
                f"{source} is encrypted with state key id {found}, not with {self.label}; "
                "pass the key this site's state was encrypted with"
            )
        if blob[len(MAGIC)] != FORMAT_VERSION:
            raise StateKeyError(
                f"{source} uses at-rest format {blob[len(MAGIC)]}; this fedinfer reads "
                f"{FORMAT_VERSION}: upgrade fedinfer"
            )
        header = blob[:HEADER_BYTES]
        body = memoryview(blob)[HEADER_BYTES:]  # no copy of a large file's ciphertext
        try:
            return self._aead.decrypt(header[-NONCE_BYTES:], body, _aad(header, name))
        except InvalidTag:
            raise tampered(
                f"{source} fails authentication: it was modified, truncated, or moved here "
                f"from another place (expected {name!r}); restore it from a backup"
            ) from None

    def derive(self, *, salt: bytes, info: bytes) -> bytes:
        """A 32-byte sub-key (HKDF-SHA256), e.g. one per audit file."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info)
        return hkdf.derive(self._secret)


def _aad(header: bytes, name: str) -> bytes:
    return header + b"\x00" + name.encode("utf-8")


def _key_id(secret: bytes) -> str:
    return hashlib.sha256(_ID_CONTEXT + secret).digest()[:KEY_ID_BYTES].hex()


def _parse_key_file(text: str, path: Path) -> bytes:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1 or not lines[0].startswith(_KEY_PREFIX + " "):
        raise StateKeyError(
            f"{path} is not a fedinfer state key file (expected one line "
            f"'{_KEY_PREFIX} <base64>'); create one with `fedinfer keys init-site-key FILE`"
        )
    try:
        secret = base64.b64decode(lines[0].split(" ", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise StateKeyError(f"the key in {path} is not valid base64") from None
    if len(secret) != KEY_BYTES:
        raise StateKeyError(f"the key in {path} has {len(secret)} bytes, not {KEY_BYTES}")
    return secret


def is_sealed(blob: bytes) -> bool:
    """Whether ``blob`` starts like a sealed file (the magic bytes)."""
    return blob[: len(MAGIC)] == MAGIC and len(blob) >= HEADER_BYTES


def sealed_key_id(blob: bytes) -> str:
    """Key id in a sealed blob's header."""
    return blob[len(MAGIC) + 1 : len(MAGIC) + 1 + KEY_ID_BYTES].hex()


# ------------------------------------------------------------ optional-key helpers
def seal_state(data: bytes, *, key: StateKey | None, name: str) -> bytes:
    """``key.seal(data)``, or ``data`` unchanged for a plaintext state (``key`` None)."""
    return data if key is None else key.seal(data, name=name)


def open_state(
    blob: bytes,
    *,
    key: StateKey | None,
    name: str,
    source: Path | str,
    tampered: type[FedInferError] = FedInferError,
) -> bytes:
    """Plaintext of a state file: opened with ``key``, or checked to be plaintext without one.

    Raises
    ------
    StateKeyError
        Sealed but no key given, plaintext but a key given, or sealed with another key.
    tampered
        Sealed with ``key`` but fails authentication.
    """
    if key is not None:
        return key.open(blob, name=name, source=source, tampered=tampered)
    if is_sealed(blob):
        raise StateKeyError(
            f"{source} is encrypted at rest (state key id {sealed_key_id(blob)}); {_FIX_MISSING}"
        )
    return blob


def reseal_file(
    path: Path,
    *,
    name: str,
    old: StateKey | None,
    new: StateKey,
    tampered: type[FedInferError] = FedInferError,
) -> bool:
    """Re-encrypt one file from ``old`` (None: plaintext) to ``new``, atomically, in place.

    Idempotent, so an interrupted migration can simply be run again: a file already
    sealed with ``new`` is only authenticated. Returns whether the file was rewritten.
    """
    blob = Path(path).read_bytes()
    if is_sealed(blob) and sealed_key_id(blob) == new.key_id:
        new.open(blob, name=name, source=path, tampered=tampered)
        return False
    plain = open_state(blob, key=old, name=name, source=path, tampered=tampered)
    atomic_write_bytes(Path(path), new.seal(plain, name=name), mode=0o600)
    return True


# -------------------------------------------------------------------- key lookup
def resolve_state_key(
    path: Path | None = None, *, protects: Sequence[Path] = ()
) -> StateKey | None:
    """The state key from ``path``, else from ``$FEDINFER_STATE_KEY_FILE``, else None.

    Parameters
    ----------
    path : Path or None
        An explicit ``--state-key FILE`` (default: None).
    protects : sequence of Path
        The directories the key encrypts: a key file inside one of them is refused
        (whoever copies the state would copy its key too).

    Raises
    ------
    StateKeyError
        The key file is missing, unsafe, malformed, or inside a directory it protects.
    """
    if path is None:
        from_env = os.environ.get(KEY_ENV_VAR, "").strip()
        if not from_env:
            return None
        path = Path(from_env)
    key_file = Path(path).resolve()
    for directory in protects:
        if key_file.is_relative_to(Path(directory).resolve()):
            raise StateKeyError(
                f"state key {path} lies inside {directory}, the state it encrypts: anyone who "
                "copies the state copies the key; move the key out (e.g. /etc/fedinfer/)"
            )
    return StateKey.load(Path(path))


# ------------------------------------------------------------------- state marker
def read_marker(state_dir: Path) -> dict[str, Any] | None:
    """``<state_dir>/at-rest.json`` (which key encrypts this state), or None if absent."""
    path = Path(state_dir) / MARKER_FILE
    try:
        marker = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateKeyError(f"{path} is unreadable ({exc}); restore it from a backup") from None
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT:
        raise StateKeyError(f"{path} is not a fedinfer at-rest marker")
    return marker


def mark_state_dir(state_dir: Path, key: StateKey, *, rekey_from: str | None = None) -> None:
    """Record (in plaintext, no secret) that ``state_dir`` is encrypted with ``key``.

    The marker is a guard against mistakes, not a security boundary: it makes a
    process without the key (or with another one) refuse the state dir instead of
    writing plaintext next to sealed files.
    """
    marker = {
        "format": _MARKER_FORMAT,
        "version": FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "key_id": key.key_id,
    }
    if rekey_from is not None:
        marker["rekey_from"] = rekey_from
    data = (json.dumps(marker, indent=2) + "\n").encode()
    atomic_write_bytes(Path(state_dir) / MARKER_FILE, data, mode=0o644)


def check_state_dir(state_dir: Path, key: StateKey | None) -> None:
    """Refuse ``key`` for ``state_dir`` when its marker names another key (or any key).

    Raises
    ------
    StateKeyError
        The state dir is marked encrypted and ``key`` is None or another key, or a
        ``fedinfer keys rekey`` of it was interrupted.
    """
    marker = read_marker(state_dir)
    if marker is None:
        return
    where = Path(state_dir) / MARKER_FILE
    if marker.get("rekey_from"):
        raise StateKeyError(
            f"{where}: re-encrypting this state from {marker['rekey_from']} to key id "
            f"{marker.get('key_id')} was interrupted; rerun the same `fedinfer keys "
            "encrypt-state` / `fedinfer keys rekey` command to finish it"
        )
    if key is None:
        raise StateKeyError(
            f"the state in {state_dir} is encrypted at rest (key id {marker.get('key_id')}, "
            f"see {where}); {_FIX_MISSING}"
        )
    if marker.get("key_id") != key.key_id:
        raise StateKeyError(
            f"the state in {state_dir} is encrypted with key id {marker.get('key_id')}, "
            f"not with {key.label}; pass the key this site's state was encrypted with"
        )
