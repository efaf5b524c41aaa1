"""Small helpers for what the CLI prints."""

from __future__ import annotations

import logging

__all__ = ["FILE_ONLY", "log_to_file", "plural"]

FILE_ONLY = "fedinfer_file_only"
"""Attribute of a log record whose text the terminal already shows (rich): files only."""

_run_log = logging.getLogger("fedinfer.run")


def log_to_file(text: str) -> None:
    """Put a line the terminal already shows into the run's log file (Hydra's ``<job>.log``).

    Console handlers that :func:`fedinfer.simulation.hydra_main` sets up drop these
    records; outside a Hydra job nothing logs ``fedinfer`` INFO records by default.
    """
    _run_log.info(text, extra={FILE_ONLY: True})


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """``1 round``, ``2 rounds`` (``plural_noun`` for irregular nouns).

    Examples
    --------
    >>> plural(1, "round"), plural(0, "job"), plural(2, "entry", "entries")
    ('1 round', '0 jobs', '2 entries')
    """
    return f"{count} {noun if count == 1 else plural_noun or noun + 's'}"
