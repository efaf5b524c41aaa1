"""Human-readable view of a site's privacy ledger (``fedinfer privacy show SITE_STATE_DIR``)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedinfer.crypto.at_rest import StateKey
from fedinfer.privacy.ledger import LEDGER_FILENAME, PrivacyLedger
from fedinfer.reporting.text import plural

__all__ = ["ledger_table", "print_ledger", "show_ledger"]


def ledger_table(ledger: PrivacyLedger) -> Table:
    """Build a rich table: one row per charge, the cumulative totals in the caption."""
    table = Table(title=f"Privacy ledger {ledger.path}", caption=_totals(ledger))
    for header in ("#", "round", "run", "time (UTC)", "steps", "noise mult.", "sample rate"):
        table.add_column(header, justify="left" if header in ("run", "time (UTC)") else "right")
    table.add_column("epsilon after", justify="right", style="bold")
    for index, entry in enumerate(ledger.entries, start=1):
        table.add_row(
            str(index),
            str(entry.round),
            entry.run_id,
            entry.time,
            str(entry.steps),
            f"{entry.noise_multiplier:.4g}",
            f"{entry.sample_rate:.4g}",
            "unbounded" if entry.epsilon_after is None else f"{entry.epsilon_after:.4f}",
        )
    return table


def _totals(ledger: PrivacyLedger) -> str:
    runs = len({entry.run_id for entry in ledger.entries})
    return (
        f"epsilon = {ledger.epsilon:.4f} at delta = {ledger.delta:.3g} "
        f"({ledger.accountant} accountant, composed over "
        f"{plural(len(ledger.entries), 'charge')}, {plural(runs, 'run')}, "
        f"{plural(ledger.total_steps, 'step')})"
        + (
            f"; {plural(len(ledger.reservations), 'open reservation')} (rounds training, or "
            "crashed) also count against the budget"
            if ledger.reservations
            else ""
        )
    )


def print_ledger(state_dir: Path, console: Console, *, key: StateKey | None = None) -> None:
    """Print the ledger of ``state_dir`` (or of a ``ledger.json`` path) to ``console``.

    ``key`` opens a ledger encrypted at rest (see :meth:`PrivacyLedger.read`).

    Raises
    ------
    PrivacyLedgerError
        If the ledger is missing, unreadable or corrupt.
    """
    ledger = PrivacyLedger.read(_state_dir_of(Path(state_dir)), key=key)
    console.print(ledger_table(ledger))


def show_ledger(path: Path) -> str:
    """Render the ledger of ``path`` (a state directory or its ``ledger.json``) as plain text.

    Examples
    --------
    >>> print(show_ledger(Path("runs/site-0")))  # doctest: +SKIP
    """
    buffer = io.StringIO()
    print_ledger(path, Console(file=buffer, width=120, color_system=None))
    return buffer.getvalue()


def _state_dir_of(path: Path) -> Path:
    return path.parent if path.name == LEDGER_FILENAME and path.is_file() else path
