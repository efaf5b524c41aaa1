"""A site's secure-aggregation state for a run, kept in its state directory.

The site's long-lived identity key, ``<state_dir>/secagg/identity.key`` (created once,
sealed like the rest), endorses each run's keys. One file per run,
``<state_dir>/secagg/run-<run_id>.json``: the run's private keys, the
highest round the site has masked, and the round awaiting unmasking. It is written
atomically and fsync'd (:func:`fedinfer.fsutil.atomic_write_bytes`) *before* a masked
upload leaves the site, and sealed with the site's state key when its state is
encrypted, so the replay guard survives a restart of the site or a resumed run; Flower's
``Context.state`` lives only as long as one Flower run and is not used.

The file is JSON (bytes as ``{"b": hex}``), never pickle.

Examples
--------
>>> store = RunStateStore(Path("state"), key=None)           # doctest: +SKIP
>>> store.save(run_id, site.to_state()); store.load(run_id)  # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedinfer.crypto.at_rest import StateKey, open_state, seal_state
from fedinfer.errors import SecAggAbort
from fedinfer.fsutil import atomic_write_bytes
from fedinfer.secagg.keys import KEY_BYTES, identity_public, new_identity
from fedinfer.secagg.site import SiteSecAgg

__all__ = ["RunStateStore", "open_site"]


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b": value.hex()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"cannot store a {type(value).__name__} in the secagg state")
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return bytes.fromhex(value["b"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class RunStateStore:
    """Per-run secure-aggregation state files of one site.

    Parameters
    ----------
    state_dir : Path
        The site's state directory.
    key : StateKey or None
        Seals the files when the site's state is encrypted; None: plaintext.
    """

    def __init__(self, state_dir: Path, *, key: StateKey | None) -> None:
        self.directory = Path(state_dir) / "secagg"
        self.key = key

    def path(self, run_id: int) -> Path:
        """The file of run ``run_id``."""
        return self.directory / f"run-{int(run_id)}.json"

    def _name(self, run_id: int) -> str:
        return f"secagg/run-{int(run_id)}"

    @contextmanager
    def locked(self, run_id: int) -> Iterator[None]:
        """Hold an exclusive ``flock`` for ``run_id``: load, act and save inside it.

        Two ClientApp processes of the same site (a resumed coordinator's message racing a
        dead one's) would otherwise save stale state over each other, undoing the replay
        guard.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"run-{int(run_id)}.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def exists(self, run_id: int) -> bool:
        """Whether the site has state (keys, replay guard) for ``run_id``."""
        return self.path(run_id).exists()

    def load(self, run_id: int) -> dict[str, Any]:
        """The state saved for ``run_id``.

        Raises
        ------
        SecAggAbort
            If there is none (set-up was missed) or it is not a state file.
        StateKeyError
            If it is sealed with another key, or plaintext where a key is expected.
        """
        path = self.path(run_id)
        if not path.exists():
            raise SecAggAbort(
                f"this site has no secure-aggregation keys for run {run_id} ({path}); "
                "the set-up was missed"
            )
        raw = open_state(
            path.read_bytes(),
            key=self.key,
            name=self._name(run_id),
            source=path,
            tampered=SecAggAbort,
        )
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SecAggAbort(f"{path} is not a secure-aggregation state file: {exc}") from exc
        if not isinstance(data, dict):
            raise SecAggAbort(f"{path} is not a secure-aggregation state file")
        return {k: _decode(v) for k, v in data.items()}

    def identity(self) -> bytes:
        """The site's identity key (raw Ed25519 private bytes), created on first use.

        Raises
        ------
        SecAggAbort
            If the file is not an identity key or fails authentication.
        """
        path, name = self.directory / "identity.key", "secagg/identity"
        if not path.exists():
            atomic_write_bytes(path, seal_state(new_identity(), key=self.key, name=name))
        raw = open_state(
            path.read_bytes(), key=self.key, name=name, source=path, tampered=SecAggAbort
        )
        if len(raw) != KEY_BYTES:
            raise SecAggAbort(f"{path} is not a secure-aggregation identity key")
        return raw

    def reseal(self, *, old: StateKey | None, new: StateKey) -> int:
        """Re-encrypt the identity key and every run's state from ``old`` to ``new``, in place.

        ``old`` None: plaintext (``fedinfer keys encrypt-state``; ``rekey`` otherwise).
        Each file is replaced atomically, and one already sealed with ``new`` is left as
        is, so running it again finishes an interrupted migration. The identity key stays
        the same: the site's peers keep trusting it. Returns the number of files rewritten.
        """
        from fedinfer.crypto.at_rest import reseal_file

        if not self.directory.is_dir():
            return 0
        rewritten = 0
        identity = self.directory / "identity.key"
        if identity.is_file():
            rewritten += reseal_file(
                identity, name="secagg/identity", old=old, new=new, tampered=SecAggAbort
            )
        for path in sorted(self.directory.glob("run-*.json")):
            run_id = int(path.stem.removeprefix("run-"))
            with self.locked(run_id):
                rewritten += reseal_file(
                    path, name=self._name(run_id), old=old, new=new, tampered=SecAggAbort
                )
        return rewritten

    def identity_public(self) -> bytes:
        """The raw Ed25519 public half of :meth:`identity` (created on first use).

        What the site's peers list in their ``secagg_trusted_peers`` file.
        """
        return identity_public(self.identity())

    def save(self, run_id: int, state: Mapping[str, Any]) -> Path:
        """Write ``state`` for ``run_id`` atomically and durably (sealed with a key)."""
        raw = json.dumps({k: _encode(v) for k, v in state.items()}, sort_keys=True).encode()
        return atomic_write_bytes(
            self.path(run_id), seal_state(raw, key=self.key, name=self._name(run_id))
        )


def open_site(
    store: RunStateStore, *, site_id: int, run_id: int, **floor: Any
) -> tuple[SiteSecAgg, bool]:
    """The site's protocol state for ``run_id``: loaded if it exists, else fresh keys.

    Set-up never resets a run: asked again (a resumed run, a re-asked round, a restarted
    site), it returns the same keys and the same replay guard. Returns the site and whether
    it was created (and must be saved).

    Raises
    ------
    SecAggAbort
        If the stored state is of another site id.
    """
    if store.exists(run_id):
        site = SiteSecAgg.from_state(store.load(run_id), **floor)
        if site.site_id != site_id:
            raise SecAggAbort(
                f"the secure-aggregation state of run {run_id} in {store.directory} belongs "
                f"to site {site.site_id}, not {site_id}"
            )
        return site, False
    return SiteSecAgg.create(site_id, run_id=run_id, **floor), True
