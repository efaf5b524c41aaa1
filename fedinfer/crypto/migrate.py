"""Re-encrypt a whole site state directory: plaintext to encrypted, or one key to another.

Crash safety without a second copy of the state: every file is replaced atomically
(sealed temporary file, fsync, ``os.replace``) and a file already sealed with the
new key is skipped, so running the same command again finishes an interrupted
run. While it runs, the state's marker (``at-rest.json``) says so
(``rekey_from``), and every fedinfer process refuses the state until it is done.
A migration takes the locks of the model store, the ledger and the audit log: a
running site server (which holds the audit log's lock) makes it refuse to start.

What an in-place migration cannot do: scrub the disk blocks that held the old
plaintext. Migrate onto a fresh volume, or wipe free space, where that matters.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedinfer.artifacts import ModelStore
from fedinfer.crypto.at_rest import StateKey, mark_state_dir, read_marker
from fedinfer.errors import ConfigError, StateKeyError

__all__ = ["ResealReport", "reseal_state_dir"]

_PLAINTEXT = "plaintext"


@dataclass(frozen=True)
class ResealReport:
    """Files rewritten by :func:`reseal_state_dir`, per part of the state."""

    models: int
    ledger: int
    audit: int
    removed: tuple[str, ...]
    """Leftovers deleted (staging debris of crashed publishes, stale temporary files)."""
    secagg: int = 0
    """Secure-aggregation files: the identity key (same key after) and per-run state."""


def reseal_state_dir(state_dir: Path, *, old: StateKey | None, new: StateKey) -> ResealReport:
    """Re-encrypt the model store, ledger, audit log and secure-aggregation keys of
    ``state_dir`` with ``new``.

    Parameters
    ----------
    state_dir : Path
        A site's state directory (``models/``, ``ledger.json``, ``audit/``).
    old : StateKey or None
        The key the state is encrypted with now; None for a plaintext state.
    new : StateKey
        The key to encrypt it with.

    Raises
    ------
    StateKeyError
        ``old`` is not the key the state is marked with, or an interrupted run was
        started with other keys.
    ServingError
        A server is running on this state (stop the site first).

    Examples
    --------
    >>> reseal_state_dir(Path("/var/lib/fedinfer"), old=None,
    ...                  new=StateKey.load(Path("/etc/fedinfer/state.key")))  # doctest: +SKIP
    """
    from fedinfer.privacy.ledger import reseal_ledger
    from fedinfer.secagg.store import RunStateStore
    from fedinfer.serving.audit import locked_audit_dir, reseal_audit

    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise ConfigError(f"state directory {state_dir} does not exist")
    _check_start(state_dir, read_marker(state_dir), old=old, new=new)
    audit_dir = state_dir / "audit"
    audit_dir.mkdir(mode=0o700, exist_ok=True)
    with locked_audit_dir(audit_dir):
        mark_state_dir(state_dir, new, rekey_from=old.key_id if old else _PLAINTEXT)
        models = ModelStore(state_dir / "models", key=old)
        report = ResealReport(
            models=models.reseal(new) if models.root.is_dir() else 0,
            ledger=int(reseal_ledger(state_dir, old=old, new=new)),
            audit=reseal_audit(audit_dir, old=old, new=new),
            removed=_remove_leftovers(state_dir),
            secagg=RunStateStore(state_dir, key=old).reseal(old=old, new=new),
        )
        mark_state_dir(state_dir, new)
    return report


def _check_start(
    state_dir: Path, marker: dict[str, Any] | None, *, old: StateKey | None, new: StateKey
) -> None:
    if marker is None:
        return  # never marked: the files themselves refuse a wrong `old`
    old_id = old.key_id if old else _PLAINTEXT
    if marker.get("rekey_from"):  # an interrupted run: only the same keys may finish it
        if (marker["rekey_from"], marker.get("key_id")) != (old_id, new.key_id):
            raise StateKeyError(
                f"{state_dir} is half-way from {marker['rekey_from']} to key id "
                f"{marker.get('key_id')}; rerun with exactly those keys to finish"
            )
        return
    if marker.get("key_id") not in (old_id, new.key_id):
        raise StateKeyError(
            f"{state_dir} is encrypted with key id {marker.get('key_id')}, not with "
            f"{old.label if old else 'no key (plaintext)'}; pass its current key as the old key"
        )


def _remove_leftovers(state_dir: Path) -> tuple[str, ...]:
    """Delete files an older fedinfer or a crash may have left in plaintext."""
    doomed = [
        *state_dir.glob(".incoming-*"),  # artifacts received before at-rest encryption
        *state_dir.glob(".ledger.json.*.tmp"),
        *(state_dir / "models" / ".staging").glob("*"),
    ]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return tuple(str(p.relative_to(state_dir)) for p in doomed)
