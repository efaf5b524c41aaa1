"""The rich Console of every command: the terminal's width on a terminal, uncut when piped.

Rich falls back to 80 columns when its output is not a terminal, which cuts tables written to
a pipe or a log into wrapped, truncated cells. Here a pipe gets the table's natural width
(``$COLUMNS`` still wins when set).
"""

from __future__ import annotations

import os
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["PIPE_WIDTH", "make_console"]

PIPE_WIDTH = 10_000
"""Columns of a console that is not a terminal: tables are as wide as their cells."""


def make_console(*, file: IO[str] | None = None, **kwargs: Any) -> Console:
    """A ``rich.console.Console`` sized for where it writes.

    Examples
    --------
    >>> import io
    >>> make_console(file=io.StringIO()).width
    10000
    """
    from rich.console import Console

    kwargs.setdefault("highlight", False)
    kwargs.setdefault("soft_wrap", True)
    console = Console(file=file, **kwargs)
    if "width" not in kwargs and not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console
