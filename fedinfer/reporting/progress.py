"""Terminal progress: one line per round, not a wall of Flower/Ray logs."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.text import Text

from fedinfer.fl.loop import RoundRecord
from fedinfer.tasks import task_spec

__all__ = ["RoundPrinter"]

_SHORT = {"accuracy": "acc"}


class RoundPrinter:
    """Prints a header, then one aligned line per round with the task's metrics and times.

    The metric columns are the task's (:mod:`fedinfer.tasks`): ``acc f1`` (multiclass),
    ``acc auc f1`` (binary), ``acc f1 auc`` (multilabel), ``rmse mae r2`` (regression).
    """

    def __init__(
        self,
        *,
        num_rounds: int,
        console: Console | None = None,
        enabled: bool = True,
        task: str = "multiclass",
    ) -> None:
        if console is None:
            from fedinfer.console import make_console

            console = make_console()
        self.console = console
        self.metrics = task_spec(task).metrics
        self.num_rounds = num_rounds
        self.enabled = enabled
        self.started = time.perf_counter()
        self._header_done = False
        self._legend_done = False
        self.console = _LoggedConsole(self.console)  # type: ignore[assignment]

    def line(self, record: RoundRecord, *, previous: RoundRecord | None = None) -> None:
        """Print one round.

        Each metric (``acc`` ...) is the coordinator's held-out value, or without one (a
        deployment) the sites' sample-weighted evaluation of this round's model, marked ``*``,
        else that of the previous round's model, marked ``^``: ``previous`` is the round whose
        federated metrics came with this round's train replies (:mod:`fedinfer.fl.loop`; only
        the last round has an evaluate exchange of its own). A one-line legend comes before
        the first ``^``. There is no separate federated column: in a simulation the held-out
        split is the union of the sites' test splits, so the sample-weighted site accuracy
        equals ``acc`` exactly; in DP mode sites refuse evaluation by default (their
        policy's ``allow_evaluation``).
        """
        if not self.enabled:
            return
        if not self._header_done:
            columns = "".join(f"{_SHORT.get(m, m):<10}" for m in self.metrics)
            self.console.print(
                f"[bold]round    {columns}loss     max-eps  "
                "ok/refused/failed  round-s  elapsed-s[/]"
            )
            self._header_done = True
        cells = [self._value(record, m, previous) for m in self.metrics]
        if not self._legend_done and any(c.endswith("^") for c in cells):
            self.console.print(
                "  (* the sites' evaluation of the round's model; ^ of the previous round's "
                "model, sent back with this round's train replies)"
            )
            self._legend_done = True
        values = "".join(f"{c:<10}" for c in cells)
        loss = f"{record.loss:.4f}" if record.loss is not None else "   -  "
        eps = max(record.epsilon.values(), default=None)
        eps_txt = f"{eps:7.3f}" if eps is not None else "     - "
        sites = f"{len(record.sites)}/{len(record.refused)}/{len(record.failed)}"
        self.console.print(
            f"{record.round:>3}/{self.num_rounds:<3}  {values}{loss:>7}  "
            f"{eps_txt}  "
            f"{sites:^17}  {record.duration_s:7.2f}  {time.perf_counter() - self.started:9.1f}"
        )

    @staticmethod
    def _value(record: RoundRecord, name: str, previous: RoundRecord | None) -> str:
        """The held-out value, else the sites' evaluation (``*`` this round's model, ``^`` the
        previous round's), else ``-``."""
        central = record.metrics.get(name)
        if central is None and name == "accuracy":
            central = record.accuracy
        if central is not None:
            return f"{central:.4f} "
        fed = record.federated.get(f"eval-{name}")
        if fed is not None:
            return f"{fed:.4f}*"
        late = previous.federated.get(f"eval-{name}") if previous is not None else None
        return f"{late:.4f}^" if late is not None else "   -   "

    def message(self, text: str) -> None:
        """Print a status line."""
        if self.enabled:
            self.console.print(text)


class _LoggedConsole:
    """A console whose every printed line also goes to the run's log file (plain text)."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def print(self, text: str, **kwargs: Any) -> None:
        from fedinfer.reporting.text import log_to_file

        log_to_file(Text.from_markup(text).plain)
        self._console.print(text, **kwargs)
