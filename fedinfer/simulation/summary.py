"""The last lines of ``fedinfer simulate``: where the run wrote, what it reached, what still runs.

A job ends with its output directory, its final accuracy and largest epsilon,
and either the live site URLs (``serving.keep_alive=true``) or that the site
servers have stopped: never a table of endpoints that are already dead. A
multirun ends with a tally of its jobs and the sweep directory
(:class:`MultirunTally`, a Hydra callback named in ``conf/config.yaml``) and
exits non-zero when a job failed.

Every line also goes to the job's Hydra log file
(:func:`fedinfer.reporting.text.log_to_file`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from rich.console import Console
from rich.markup import escape

from fedinfer.config.schema import FedInferConfig
from fedinfer.reporting.text import log_to_file, plural

__all__ = [
    "JOB_FAILED",
    "MultirunTally",
    "console_for_output",
    "finish_job",
    "job_summary",
]

JOB_FAILED = 1
"""Exit code of a multirun in which a job failed (a mistake in the arguments: 2)."""


def console_for_output() -> Console:
    """A console that keeps long lines whole when piped (rich defaults pipes to 80 columns)."""
    from fedinfer.console import make_console

    return make_console()


def _say(console: Console, lines: Sequence[str], *, log: bool = True) -> None:
    for line in lines:
        console.print(escape(line))
        if log:  # a job's log file; a multirun's own process has none (Hydra's console only)
            log_to_file(line)


# ------------------------------------------------------------------------- one job
def job_summary(results: dict[str, Any], *, output_dir: Path, servers: str) -> list[str]:
    """The closing lines of one job, from its ``results.json`` data.

    Examples
    --------
    >>> job_summary({"status": "completed", "rounds": [{}, {}], "final_accuracy": 0.75,
    ...              "max_epsilon": 3.0, "dp": True}, output_dir=Path("/o"), servers="x")[1]
    'Run completed: 2 rounds, final accuracy 0.7500, max epsilon 3.000'
    """
    records = list(results.get("rounds") or [])
    rounds, aggregated = len(records), sum(bool(r.get("aggregated", True)) for r in records)
    status = str(results.get("status", "completed"))
    accuracy = _number(results.get("final_accuracy"))
    outcome = f"Run {status}: {plural(rounds, 'round')}"
    if aggregated < rounds:  # e.g. every site refused: the model never moved
        outcome += f" ({aggregated} aggregated: see the warnings above)"
    if status == "stopped" and results.get("stop_reason"):
        outcome += f" ({results['stop_reason']})"
    if accuracy is not None:
        outcome += f", final accuracy {accuracy:.4f}"
    else:  # a task without accuracy (regression) reports its own final metrics
        finals = {k: _number(v) for k, v in (results.get("final_metrics") or {}).items()}
        shown = [f"final {k} {v:.4f}" for k, v in finals.items() if v is not None]
        outcome += ", " + ", ".join(shown) if shown else ", no accuracy"
    return [f"Output directory: {output_dir}", f"{outcome}, {_epsilon_text(results)}", servers]


def _epsilon_text(results: dict[str, Any]) -> str:
    epsilon = _number(results.get("max_epsilon"))
    central = results.get("central_dp") or {}
    if epsilon is None and isinstance(central, dict):
        epsilon = _number(central.get("epsilon"))
    if not results.get("dp", epsilon is not None):
        return "max epsilon - (no DP guarantee)"
    return f"max epsilon {epsilon:.3f}" if epsilon is not None else "max epsilon -"


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def finish_job(
    cfg: FedInferConfig,
    results: dict[str, Any],
    *,
    output_dir: Path,
    console: Console | None = None,
) -> None:
    """Serve the final model at every site (if ``serving.enabled``), then print the summary.

    With ``serving.keep_alive`` the summary lists the live URLs and the servers run
    until Ctrl-C; otherwise they stop before the summary says so.
    """
    from fedinfer.simulation.serve_demo import site_servers

    console = console or console_for_output()
    if not cfg.serving.enabled:
        servers = "Site servers: not started (serving.enabled=false)."
        _say(console, job_summary(results, output_dir=output_dir, servers=servers))
        return
    with site_servers(cfg, output_dir=output_dir, console=console) as answers:
        if cfg.serving.keep_alive and answers:
            live = "Site servers running (Ctrl-C stops them):"
            _say(console, job_summary(results, output_dir=output_dir, servers=live))
            _say(console, [f"  {a.site_id}  {a.url}/v2/models/{cfg.model.name}" for a in answers])
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
            _say(console, ["Site servers stopped."])
            return
    servers = (
        "Site servers stopped (serving.keep_alive=true keeps them)."
        if answers
        else "Site servers: none started (no site holds a model)."
    )
    _say(console, job_summary(results, output_dir=output_dir, servers=servers))


# ------------------------------------------------------------------------ multirun
class MultirunTally(Callback):
    """Hydra callback: after a multirun, print the tally of its jobs.

    Named in ``conf/config.yaml`` under ``hydra.callbacks``; reads every job's
    ``results.json`` under the sweep directory, so it works with any launcher
    (jobs in this process, in joblib workers, on Slurm). If a job failed (or
    none ran) the process exits with :data:`JOB_FAILED`: this is the last step of
    a multirun, and every entry point (``fedinfer simulate -m``, ``fedinfer sweep``,
    ``python simulations/run.py -m``) then reports the failure to its caller.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        """Print the tally; exit with :data:`JOB_FAILED` if a job failed."""
        from fedinfer.errors import DataError
        from fedinfer.reporting.sweep import is_failure, load_sweep, tally_lines

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        try:
            jobs = load_sweep(sweep_dir)
        except DataError:
            jobs = []
        _say(console_for_output(), tally_lines(jobs, sweep_dir), log=False)
        if not jobs or any(is_failure(j.status) for j in jobs):
            # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings.
            raise SystemExit(JOB_FAILED)
