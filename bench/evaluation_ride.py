"""Federated evaluation on the train exchange: exchanges and in-process round time, old vs new.

Runs the same non-DP in-process simulation with this tree's fedinfer and with an older
source tree's (``--baseline``, e.g. a ``git archive`` of the commit before the change),
interleaved repeat by repeat, each run in a fresh process. Reports per tree: exchanges
(``send_and_receive`` calls) per round, the median round time of the rounds whose evaluation
rides on the next train exchange (all but the last) and of the last round, and whether both
trees' federated metrics are the same numbers.

    cd /tmp && python $REPO/bench/evaluation_ride.py --baseline OLD [--sites 5 --rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

RUN = r"""
import json, sys, tempfile, time
from fedinfer.config import load_config
from fedinfer.fl.grid import InProcessGrid
from fedinfer.simulation import run as sim_run

class Counting(InProcessGrid):
    exchanges = 0
    def send_and_receive(self, messages, *, timeout=None):
        Counting.exchanges += 1
        return super().send_and_receive(messages, timeout=timeout)

sim_run.InProcessGrid = Counting
cfg = load_config(json.loads(sys.argv[1]))
started = time.perf_counter()
result = sim_run.run_simulation(cfg, output_dir=tempfile.mkdtemp())
print(json.dumps({
    "total_s": time.perf_counter() - started,
    "exchanges": Counting.exchanges,
    "rounds": [
        {"duration_s": r["duration_s"], "federated": r["federated"]}
        for r in result.results["rounds"]
    ],
}))
"""


def run(tree: Path, overrides: list[str]) -> dict[str, Any]:
    """One simulation with ``tree``'s fedinfer, in a fresh process outside any source tree."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(overrides)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians: round time of rounds 2..R-1 (warm, a next round follows) and of the last."""
    riding = [r["duration_s"] for run in runs for r in run["rounds"][1:-1]]
    last = [run["rounds"][-1]["duration_s"] for run in runs]
    return {
        # every exchange of the run, the final publication (query.deploy) included
        "exchanges": statistics.median(r["exchanges"] for r in runs),
        "round_s": statistics.median(riding),
        "last_round_s": statistics.median(last),
        "total_s": statistics.median(r["total_s"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the older source tree")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    this = Path(__file__).resolve().parent.parent
    overrides = [
        "privacy=none", "secagg=off", "simulation.runtime=inprocess", "serving.enabled=false",
        "simulation.progress=false", f"federation.num_sites={args.sites}",
        f"federation.rounds={args.rounds}", "dataset.num_samples=2000",
        "federation.local_epochs=1",
    ]  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "this": []}
    for _ in range(args.repeat):  # interleaved: both under the same machine load
        runs["baseline"].append(run(args.baseline, overrides))
        runs["this"].append(run(this, overrides))
    same = all(
        a["federated"] == b["federated"]
        for x, y in zip(runs["baseline"], runs["this"], strict=True)
        for a, b in zip(x["rounds"], y["rounds"], strict=True)
    )
    report = {
        "command": " ".join(["python bench/evaluation_ride.py", *sys.argv[1:]]),
        "load": os.getloadavg()[0],
        "overrides": overrides,
        "baseline": summary(runs["baseline"]),
        "this": summary(runs["this"]),
        "same_federated_metrics": same,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "evaluation_ride.json").write_text(json.dumps({**report, "runs": runs}, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
