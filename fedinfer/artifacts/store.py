"""ModelStore: a site-local directory of verified model versions with an atomic "current".

Layout::

    <root>/
      versions/<version>/weights.safetensors, manifest.json   complete, verified artifacts
      CURRENT       {"version": 7, "previous": 6, "switched_at": "..."}: replaced atomically
      .staging/     in-progress publishes (never read; cleaned by the next publish)
      .lock         flock() serialising writers (publish / rollback / prune)

Crash safety: a publish copies into ``.staging``, fsyncs, verifies the *copy*
(signature, then SHA-256), renames it into ``versions/`` and only then replaces
``CURRENT`` (tempfile + fsync + ``os.replace``). A crash at any point leaves
``CURRENT`` naming a complete, verified version (or none yet). Readers such as
the inference server never take the lock: they read ``CURRENT`` (always whole)
and the immutable version directories.
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedinfer.artifacts.artifact import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    fsync_dir,
    read_manifest,
    read_weights,
    verify_artifact,
    verify_manifest_signature,
)
from fedinfer.artifacts.manifest import ModelManifest
from fedinfer.errors import ConfigError, ModelIntegrityError
from fedinfer.fsutil import atomic_write_bytes

__all__ = ["ModelStore"]

logger = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"


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

    Examples
    --------
    >>> store = ModelStore(site_dir / "models")  # doctest: +SKIP
    >>> store.publish(artifact_dir, public_key=coordinator_pub)  # doctest: +SKIP
    3
    >>> weights, manifest = store.load()  # doctest: +SKIP
    """

    def __init__(self, root: Path, *, keep: int = 5) -> None:
        if keep < 2:
            raise ConfigError(
                f"ModelStore `keep` must be >= 2 so rollback stays possible (got {keep})"
            )
        self.root = Path(root)
        self.keep = keep

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r}, keep={self.keep})"

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
        return read_manifest(self.path(self._resolve(version)))

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
        manifest = read_manifest(self.path(resolved))
        if manifest.version != resolved:
            raise ModelIntegrityError(
                f"{self.path(resolved)} holds version {manifest.version}, not {resolved}"
            )
        if public_key is not None:
            verify_manifest_signature(manifest, public_key=public_key)
        return read_weights(self.path(resolved), manifest), manifest

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
        try:
            raw = (self.root / CURRENT_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
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
        with self._locked():
            self._clean_staging()
            staging = self._stage_copy(Path(artifact_dir))
            try:
                manifest = self._verify_staged(staging, artifact_dir, public_key)
                if (self.path(manifest.version) / MANIFEST_FILE).is_file():
                    return self._republish(manifest)
                self._check_acceptable(manifest)
                os.rename(staging, self.path(manifest.version))
                fsync_dir(self.versions_dir)
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

    def _stage_copy(self, artifact_dir: Path) -> Path:
        staging_root = self.root / ".staging"
        staging_root.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=staging_root))
        for name in (WEIGHTS_FILE, MANIFEST_FILE):
            src = artifact_dir / name
            if not src.is_file():
                shutil.rmtree(staging, ignore_errors=True)
                self._reject(artifact_dir, f"missing {name}")
            with open(src, "rb") as fin, open(staging / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())
        os.chmod(staging, 0o755)
        return staging

    def _verify_staged(
        self, staging: Path, artifact_dir: Path, public_key: Ed25519PublicKey
    ) -> ModelManifest:
        # Verify the copy, not the source: the source may change after we read it.
        try:
            return verify_artifact(staging, public_key=public_key)
        except ModelIntegrityError as exc:
            self._reject(artifact_dir, str(exc))

    def _reject(self, artifact_dir: Path, reason: str) -> NoReturn:
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
        atomic_write_bytes(self.root / CURRENT_FILE, json.dumps(state).encode(), mode=0o644)
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
