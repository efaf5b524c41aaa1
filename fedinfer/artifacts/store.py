"""ModelStore: a site-local directory of verified model versions with an atomic "current".

Layout::

    <root>/
      versions/<version>/weights.safetensors, manifest.json   complete, verified artifacts
      CURRENT       {"version": 7, "previous": 6, "switched_at": "..."}: replaced atomically
      SIGNING_KEY   {"public_key": hex, "fingerprint": ...}: the coordinator key pinned at the
                    first publish; every later publish and every load is checked against it
      .staging/     in-progress publishes (never read; cleaned by the next publish)
      .lock         flock() serialising writers (publish / rollback / prune)

Crash safety: a publish reads the artifact into memory once, verifies those
bytes (signature, then SHA-256), writes exactly them into ``.staging``, fsyncs,
renames the directory into ``versions/`` and only then replaces ``CURRENT``
(tempfile + fsync + ``os.replace``). A crash at any point leaves ``CURRENT``
naming a complete, verified version (or none yet). Readers such as the
inference server never take the lock: they read ``CURRENT`` (always whole) and
the immutable version directories.

Encryption at rest (``key=``, a :class:`~fedinfer.crypto.StateKey`): the
manifest, the weights and ``CURRENT`` are sealed (ChaCha20-Poly1305), each bound
to its logical name (``model-store/versions/7/weights.safetensors``), so a file
swapped between versions fails authentication. Staging files are sealed before
they are written: no plaintext byte of a model ever reaches the disk. Signature
and SHA-256 cover the plaintext, as without encryption, and are checked after
decryption, in memory (safetensors loads from bytes). Directory names (the
version numbers) stay visible.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedinfer.artifacts.artifact import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    verify_artifact_bytes,
    verify_manifest_signature,
    weights_from_bytes,
)
from fedinfer.artifacts.manifest import ModelManifest
from fedinfer.artifacts.signing import key_fingerprint
from fedinfer.crypto.at_rest import StateKey, open_state, reseal_file, seal_state
from fedinfer.errors import ConfigError, ModelIntegrityError
from fedinfer.fsutil import atomic_write_bytes, fsync_directory

__all__ = ["ModelStore"]

logger = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
SIGNING_KEY_FILE = "SIGNING_KEY"


class ModelStore:
    """A site's versioned model directory (see the module docstring for layout and guarantees).

    Parameters
    ----------
    root : Path
        The store directory (created on first publish).
    keep : int
        Retention: how many newest versions to keep (default: 5). The current
        version and the rollback target (newest version older than current)
        are never deleted, whatever ``keep`` says.
    key : StateKey or None
        Seal everything the store writes and open everything it reads with this site
        key (default: None, plaintext). A store is all sealed or all plaintext: the
        wrong mode, or another key, raises :class:`~fedinfer.errors.StateKeyError`.

    Examples
    --------
    >>> store = ModelStore(site_dir / "models")  # doctest: +SKIP
    >>> store.publish(artifact_dir, public_key=coordinator_pub)  # doctest: +SKIP
    3
    >>> weights, manifest = store.load()  # doctest: +SKIP
    """

    def __init__(self, root: Path, *, keep: int = 5, key: StateKey | None = None) -> None:
        if keep < 2:
            raise ConfigError(
                f"ModelStore `keep` must be >= 2 so rollback stays possible (got {keep})"
            )
        self.root = Path(root)
        self.keep = keep
        self.key = key

    def __repr__(self) -> str:
        sealed = f", key={self.key.key_id!r}" if self.key else ""
        return f"ModelStore({str(self.root)!r}, keep={self.keep}{sealed})"

    # ------------------------------------------------------------------ read side
    @property
    def versions_dir(self) -> Path:
        """Directory holding one sub-directory per stored version."""
        return self.root / "versions"

    def path(self, version: int) -> Path:
        """Directory of ``version`` (which may not exist)."""
        return self.versions_dir / str(int(version))

    def versions(self) -> list[int]:
        """Return the stored versions, ascending."""
        if not self.versions_dir.is_dir():
            return []
        found = (p.name for p in self.versions_dir.iterdir() if p.is_dir())
        return sorted(int(name) for name in found if name.isdigit())

    def current_version(self) -> int | None:
        """Return the version being served, or None before the first publish."""
        state = self._read_current()
        return None if state is None else int(state["version"])

    def manifest(self, version: int | None = None) -> ModelManifest:
        """Manifest of ``version`` (default: current). Verified at publish; parsed only here."""
        return ModelManifest.from_json(self._read(self._resolve(version), MANIFEST_FILE))

    def load(
        self, version: int | None = None, *, public_key: Ed25519PublicKey | None = None
    ) -> tuple[dict[str, np.ndarray], ModelManifest]:
        """Weights and manifest of ``version`` (default: current), re-checking the SHA-256.

        With ``public_key`` the signature is verified again as well.

        Raises
        ------
        ModelIntegrityError
            The stored files were altered since publication, or no such version.
        """
        resolved = self._resolve(version)
        manifest = ModelManifest.from_json(self._read(resolved, MANIFEST_FILE))
        if manifest.version != resolved:
            raise ModelIntegrityError(
                f"{self.path(resolved)} holds version {manifest.version}, not {resolved}"
            )
        pinned = self.pinned_key()
        if public_key is not None and pinned is not None and _raw(public_key) != _raw(pinned):
            raise ModelIntegrityError(
                f"the given public key {key_fingerprint(public_key)} is not the key this store "
                f"is pinned to ({key_fingerprint(pinned)}, in {self.root / SIGNING_KEY_FILE})"
            )
        trusted = public_key or pinned
        if trusted is not None:  # a store that held a signed version serves only signed ones
            verify_manifest_signature(manifest, public_key=trusted)
        return weights_from_bytes(self._read(resolved, WEIGHTS_FILE), manifest), manifest

    def _read(self, version: int, file_name: str) -> bytes:
        """Plaintext of one stored file, decrypted in memory when the store is sealed."""
        path = self.path(version) / file_name
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ModelIntegrityError(f"cannot read {path}: {exc.strerror}") from None
        return open_state(
            blob,
            key=self.key,
            name=_sealed_name(f"versions/{int(version)}/{file_name}"),
            source=path,
            tampered=ModelIntegrityError,
        )

    def _resolve(self, version: int | None) -> int:
        if version is None:
            current = self.current_version()
            if current is None:
                raise ModelIntegrityError(f"model store {self.root} has no current version yet")
            return current
        if not (self.path(version) / MANIFEST_FILE).is_file():
            raise ModelIntegrityError(
                f"model store {self.root} has no version {version} (stored: {self.versions()})"
            )
        return int(version)

    def _read_current(self) -> dict[str, Any] | None:
        path = self.root / CURRENT_FILE
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        raw = open_state(
            blob,
            key=self.key,
            name=_sealed_name(CURRENT_FILE),
            source=path,
            tampered=ModelIntegrityError,
        ).decode("utf-8", errors="replace")
        try:
            state = json.loads(raw)
            int(state["version"])
        except (ValueError, KeyError, TypeError):
            raise ModelIntegrityError(
                f"{self.root / CURRENT_FILE} is corrupt: {raw[:80]!r}"
            ) from None
        return dict(state)

    # ----------------------------------------------------------------- write side
    def publish(
        self, artifact_dir: Path, *, public_key: Ed25519PublicKey, make_current: bool = True
    ) -> int:
        """Verify an artifact, store it as a new version and (by default) make it current.

        Parameters
        ----------
        artifact_dir : Path
            A directory written by :func:`~fedinfer.artifacts.write_artifact`.
        public_key : Ed25519PublicKey
            The coordinator's public key; nothing signed by another key is accepted.
        make_current : bool
            Switch ``CURRENT`` to the new version (default: True).

        Returns
        -------
        int
            The stored version. Re-publishing an identical, already stored
            version is a no-op that returns it (and does not move ``CURRENT``).

        Raises
        ------
        ModelIntegrityError
            Unsigned, wrong key, tampered manifest or weights, a different model
            name than the store holds, a conflicting re-publish of a stored
            version, or a downgrade below the current version (use rollback).
        """
        artifact_dir = Path(artifact_dir)
        files = {
            name: self._read_source(artifact_dir, name) for name in (MANIFEST_FILE, WEIGHTS_FILE)
        }
        return self.publish_bytes(
            files[MANIFEST_FILE],
            files[WEIGHTS_FILE],
            public_key=public_key,
            make_current=make_current,
            source=str(artifact_dir),
        )

    def publish_bytes(
        self,
        manifest_raw: bytes,
        weights_raw: bytes,
        *,
        public_key: Ed25519PublicKey,
        make_current: bool = True,
        source: str = "published artifact",
    ) -> int:
        """:meth:`publish` an artifact held in memory; ``source`` names it in messages.

        A site receiving a model over the network stores it this way, so the
        artifact never touches its disk in plaintext.
        """
        with self._locked():
            self._clean_staging()
            # Verify the bytes that will be stored, not a file that may change after we read it.
            try:
                manifest = verify_artifact_bytes(manifest_raw, weights_raw, public_key=public_key)
            except ModelIntegrityError as exc:
                self._reject(source, str(exc))
            self._pin_signing_key(public_key, source)
            if (self.path(manifest.version) / MANIFEST_FILE).is_file():
                return self._republish(manifest)
            self._check_acceptable(manifest)
            staging = self._stage(manifest.version, manifest_raw, weights_raw)
            try:
                os.rename(staging, self.path(manifest.version))
                fsync_directory(self.versions_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            logger.info("stored model %r version %d", manifest.name, manifest.version)
            if make_current:
                self._switch(manifest.version)
            self._prune()
            return manifest.version

    def rollback(self, to: int | None = None) -> int:
        """Make an older stored version current again and return it.

        Parameters
        ----------
        to : int or None
            The version to serve (default: the newest stored version older than current).

        Raises
        ------
        ConfigError
            No such version, or nothing older to roll back to.
        ModelIntegrityError
            The target's files no longer match their signed hash.
        """
        with self._locked():
            current = self.current_version()
            target = to if to is not None else self._rollback_target(current)
            if target is None:
                raise ConfigError(
                    f"model store {self.root} has no version older than {current} to roll back to "
                    f"(stored: {self.versions()}); pass --to VERSION"
                )
            if target not in self.versions():
                raise ConfigError(
                    f"cannot roll back to version {target}: not in {self.root} "
                    f"(stored: {self.versions()})"
                )
            self.load(target)  # refuse to switch to a corrupted version
            self._switch(target)
            logger.warning("model store %s rolled back from %s to %d", self.root, current, target)
            return target

    def prune(self) -> list[int]:
        """Apply the retention policy now; return the versions deleted."""
        with self._locked():
            return self._prune()

    def reseal(self, new_key: StateKey) -> int:
        """Re-encrypt every stored file from :attr:`key` (None: plaintext) to ``new_key``.

        Each file is replaced atomically and a file already sealed with ``new_key`` is
        skipped, so an interrupted run is finished by running it again. Leftover
        staging debris (possibly plaintext, from a crashed publish) is deleted.
        Returns the number of files rewritten; afterwards the store uses ``new_key``.
        """
        with self._locked():
            self._clean_staging()
            files = [(self.root / CURRENT_FILE, CURRENT_FILE)] if self._has_current() else []
            if (self.root / SIGNING_KEY_FILE).is_file():
                files.append((self.root / SIGNING_KEY_FILE, SIGNING_KEY_FILE))
            for version in self.versions():
                for name in (MANIFEST_FILE, WEIGHTS_FILE):
                    files.append((self.path(version) / name, f"versions/{version}/{name}"))
            rewritten = 0
            for path, relative in files:
                rewritten += reseal_file(
                    path,
                    name=_sealed_name(relative),
                    old=self.key,
                    new=new_key,
                    tampered=ModelIntegrityError,
                )
            for version in self.versions():
                os.chmod(self.path(version), 0o700)
            self.key = new_key
            return rewritten

    def pinned_key(self) -> Ed25519PublicKey | None:
        """The coordinator key pinned at the first publish (None: nothing published yet).

        Loads verify signatures against it even when no ``public_key`` is given,
        so an unsigned or foreign-signed version planted in the directory is refused.
        """
        path = self.root / SIGNING_KEY_FILE
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ModelIntegrityError(f"cannot read {path}: {exc.strerror}") from None
        raw = open_state(
            blob,
            key=self.key,
            name=_sealed_name(SIGNING_KEY_FILE),
            source=path,
            tampered=ModelIntegrityError,
        )
        try:
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(json.loads(raw)["public_key"]))
        except (ValueError, KeyError, TypeError):
            raise ModelIntegrityError(f"{path} is corrupt; it pins the signing key") from None

    def _pin_signing_key(self, public_key: Ed25519PublicKey, source: str) -> None:
        pinned = self.pinned_key()
        if pinned is None:
            doc = {
                "public_key": _raw(public_key).hex(),
                "fingerprint": key_fingerprint(public_key),
                "pinned_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            data = seal_state(
                json.dumps(doc).encode(), key=self.key, name=_sealed_name(SIGNING_KEY_FILE)
            )
            self.root.mkdir(parents=True, exist_ok=True)
            mode = 0o600 if self.key else 0o644
            atomic_write_bytes(self.root / SIGNING_KEY_FILE, data, mode=mode)
            logger.info("model store %s: signing key %s pinned", self.root, doc["fingerprint"])
        elif _raw(pinned) != _raw(public_key):
            self._reject(
                source,
                f"signed with key {key_fingerprint(public_key)} but this store is pinned to "
                f"{key_fingerprint(pinned)}; to rotate the coordinator key, start a new store "
                f"or delete {self.root / SIGNING_KEY_FILE} deliberately",
            )

    def _has_current(self) -> bool:
        return (self.root / CURRENT_FILE).is_file()

    # ------------------------------------------------------------------ internals
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _clean_staging(self) -> None:
        staging_root = self.root / ".staging"
        if staging_root.is_dir():
            for leftover in staging_root.iterdir():  # from a publish that crashed
                shutil.rmtree(leftover, ignore_errors=True)

    def _read_source(self, artifact_dir: Path, name: str) -> bytes:
        try:
            return (artifact_dir / name).read_bytes()
        except OSError:
            self._reject(artifact_dir, f"missing {name}")

    def _stage(self, version: int, manifest_raw: bytes, weights_raw: bytes) -> Path:
        """Write the (sealed, when keyed) files of ``version`` into a fresh staging directory."""
        staging_root = self.root / ".staging"
        staging_root.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=staging_root))
        try:
            for name, data in ((WEIGHTS_FILE, weights_raw), (MANIFEST_FILE, manifest_raw)):
                sealed = seal_state(
                    data, key=self.key, name=_sealed_name(f"versions/{version}/{name}")
                )
                with open(staging / name, "wb") as fout:
                    fout.write(sealed)
                    fout.flush()
                    os.fsync(fout.fileno())
            os.chmod(staging, 0o700 if self.key else 0o755)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _reject(self, artifact_dir: Path | str, reason: str) -> NoReturn:
        logger.error("rejected model artifact %s: %s", artifact_dir, reason)
        raise ModelIntegrityError(f"rejected artifact {artifact_dir}: {reason}")

    def _republish(self, manifest: ModelManifest) -> int:
        stored = self.manifest(manifest.version)
        if (stored.weights_sha256, stored.signature) != (
            manifest.weights_sha256,
            manifest.signature,
        ):
            self._reject(
                self.path(manifest.version),
                f"version {manifest.version} is already stored with different content",
            )
        if self.current_version() is None:
            self._switch(manifest.version)
        return manifest.version

    def _check_acceptable(self, manifest: ModelManifest) -> None:
        stored = self.versions()
        if stored:
            held = self.manifest(stored[-1]).name
            if held != manifest.name:
                self._reject(
                    self.root,
                    f"artifact is model {manifest.name!r} but the store "
                    f"holds {held!r}; use one store per model",
                )
        current = self.current_version()
        if current is not None and manifest.version < current:
            self._reject(
                self.root,
                f"version {manifest.version} is older than current "
                f"{current} (a replay?); use rollback to serve old versions",
            )

    def _switch(self, version: int) -> None:
        previous = self.current_version()
        state = {
            "version": version,
            "previous": previous,
            "switched_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        data = seal_state(json.dumps(state).encode(), key=self.key, name=_sealed_name(CURRENT_FILE))
        atomic_write_bytes(self.root / CURRENT_FILE, data, mode=0o600 if self.key else 0o644)
        logger.info("model store %s: current version %s -> %d", self.root, previous, version)

    def _rollback_target(self, current: int | None) -> int | None:
        older = [v for v in self.versions() if current is not None and v < current]
        return older[-1] if older else None

    def _prune(self) -> list[int]:
        stored = self.versions()
        current = self.current_version()
        protected = set(stored[-self.keep :]) | {current, self._rollback_target(current)}
        doomed = [v for v in stored if v not in protected]
        if doomed:
            (self.root / ".staging").mkdir(exist_ok=True)
        for version in doomed:
            # Rename first so a half-deleted directory never looks like a version.
            trash = Path(tempfile.mkdtemp(dir=self.root / ".staging"))
            os.rename(self.path(version), trash / "v")
            shutil.rmtree(trash, ignore_errors=True)
            logger.info("model store %s: pruned version %d", self.root, version)
        return doomed


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _sealed_name(relative: str) -> str:
    """The logical name a stored file is sealed for (its path inside the store)."""
    return f"model-store/{relative}"
