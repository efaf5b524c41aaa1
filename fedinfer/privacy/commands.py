"""``fedinfer privacy show SITE_STATE_DIR``: a site's privacy ledger, history and totals."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from fedinfer.privacy.report import print_ledger

__all__ = ["register"]


def _show(namespace: argparse.Namespace) -> int:
    print_ledger(Path(namespace.state_dir), Console(highlight=False, soft_wrap=True))
    return 0


def register(subparsers: Any) -> None:
    """Add the ``privacy`` command group."""
    parser = subparsers.add_parser("privacy", help="inspect a site's privacy ledger")
    commands = parser.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND", required=True)
    show = commands.add_parser(
        "show", help="print a site's ledger: every round charged and the totals"
    )
    show.add_argument(
        "state_dir", metavar="SITE_STATE_DIR", help="the site's state directory (holds ledger.json)"
    )
    show.set_defaults(func=_show)
