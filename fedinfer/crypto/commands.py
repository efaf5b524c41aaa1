"""``fedinfer keys``: a site's state key: create it, encrypt a plaintext state, rotate it.

Plugged into ``fedinfer`` by :mod:`fedinfer.cli` through :func:`register`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``keys`` command group."""
    parser = subparsers.add_parser(
        "keys", help="a site's state key: encryption at rest of models, ledger and audit log"
    )
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    init = sub.add_parser(
        "init-site-key",
        help="create a site state key file (0600; refuses to overwrite)",
        description="Keep the key OUTSIDE the state directory and back it up offline: "
        "losing it loses the state it encrypts.",
    )
    init.add_argument(
        "file", type=Path, metavar="FILE", help="the key file to create, outside the state"
    )
    init.add_argument(
        "--state-dir",
        type=Path,
        help="the state directory it will protect: refuse a key file inside it",
    )
    init.set_defaults(func=_init_site_key)
    enc = sub.add_parser(
        "encrypt-state",
        help="encrypt a plaintext site state directory in place (stop the site first)",
    )
    enc.add_argument(
        "state_dir", type=Path, metavar="STATE_DIR", help="the site's state directory"
    )
    enc.add_argument(
        "--state-key",
        type=Path,
        required=True,
        metavar="FILE",
        help="the key to encrypt with (fedinfer keys init-site-key)",
    )
    enc.set_defaults(func=_encrypt_state)
    rekey = sub.add_parser(
        "rekey",
        help="re-encrypt a site state directory with a new key (stop the site first)",
        description="Crash-safe: every file is replaced atomically and the same command, "
        "run again, finishes an interrupted rekey. Keep the old key until it has finished.",
    )
    rekey.add_argument(
        "state_dir", type=Path, metavar="STATE_DIR", help="the site's encrypted state directory"
    )
    rekey.add_argument(
        "--old-key", type=Path, required=True, metavar="FILE", help="the key it is sealed with"
    )
    rekey.add_argument(
        "--new-key", type=Path, required=True, metavar="FILE", help="the key to seal it with"
    )
    rekey.set_defaults(func=_rekey)


def _init_site_key(ns: argparse.Namespace) -> int:
    from fedinfer.crypto.at_rest import StateKey, resolve_state_key

    key = StateKey.generate()
    if ns.state_dir is not None:
        resolve_state_key(ns.file, protects=[ns.state_dir])  # refuses a key inside it
    key.save(ns.file)
    print(f"state key {key.key_id} written to {ns.file} (0600)")
    print("back it up offline: without it the encrypted state cannot be read")
    return 0


def _encrypt_state(ns: argparse.Namespace) -> int:
    from fedinfer.crypto.at_rest import resolve_state_key
    from fedinfer.crypto.migrate import reseal_state_dir

    key = resolve_state_key(ns.state_key, protects=[ns.state_dir])
    assert key is not None
    _print(reseal_state_dir(ns.state_dir, old=None, new=key), ns.state_dir, key.key_id)
    return 0


def _rekey(ns: argparse.Namespace) -> int:
    from fedinfer.crypto.at_rest import resolve_state_key
    from fedinfer.crypto.migrate import reseal_state_dir

    old = resolve_state_key(ns.old_key)
    new = resolve_state_key(ns.new_key, protects=[ns.state_dir])
    assert new is not None
    _print(reseal_state_dir(ns.state_dir, old=old, new=new), ns.state_dir, new.key_id)
    return 0


def _print(report: Any, state_dir: Path, key_id: str) -> None:
    print(
        f"{state_dir}: encrypted with key id {key_id} ({report.models} model-store files, "
        f"{report.ledger} ledger, {report.audit} audit, {report.secagg} secure-aggregation "
        "files rewritten)"
    )
    if report.removed:
        print(f"removed leftovers: {', '.join(report.removed)}")
