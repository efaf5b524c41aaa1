"""Encryption at rest of a site's state (model store, privacy ledger, audit log).

One job, one module: :mod:`fedinfer.crypto.at_rest` (site key, sealed-file format,
key lookup, the state directory's marker); :mod:`fedinfer.crypto.migrate` re-seals
a whole state directory (plaintext to encrypted, or from one key to another).
"""

from fedinfer.crypto.at_rest import (
    ALGORITHM,
    KEY_ENV_VAR,
    MARKER_FILE,
    StateKey,
    check_state_dir,
    is_sealed,
    mark_state_dir,
    open_state,
    read_marker,
    resolve_state_key,
    seal_state,
    sealed_key_id,
)

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
    "resolve_state_key",
    "seal_state",
    "sealed_key_id",
]
