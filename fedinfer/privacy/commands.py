"""``fedinfer privacy show STATE_DIR``: a site's privacy ledger, history and totals."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _show(namespace: argparse.Namespace) -> int:
    from fedinfer.console import make_console
    from fedinfer.crypto.at_rest import resolve_state_key
    from fedinfer.privacy.report import print_ledger

    state_dir = Path(namespace.state_dir)
    key = resolve_state_key(namespace.state_key, protects=[state_dir])
    print_ledger(state_dir, make_console(), key=key)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``privacy`` command group."""
    parser = subparsers.add_parser("privacy", help="inspect a site's privacy ledger")
    commands = parser.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND", required=True)
    show = commands.add_parser(
        "show", help="print a site's ledger: every round charged and the totals"
    )
    show.add_argument(
        "state_dir", metavar="STATE_DIR", help="the site's state directory (holds ledger.json)"
    )
    show.add_argument(
        "--state-key",
        type=Path,
        metavar="FILE",
        help="the site's state key, if its state is encrypted at rest "
        "(default: $FEDINFER_STATE_KEY_FILE)",
    )
    show.set_defaults(func=_show)
