"""Simulation scale: time per round and peak memory at 10, 100 and 1,000 simulated sites.

Each point is a fresh `fedinfer simulate` process on Flower's Ray runtime (its own private Ray),
with the same work per site (``--per-site`` samples of MNIST-1D, iid), ``fraction_train`` and
``fraction_evaluate`` 0.02 (at least ``min_sites``=2 sites), no DP and no secure aggregation.
While it runs, this script samples the PSS and RSS of the whole process tree (driver, raylet,
GCS, every actor) every 0.25 s; PSS counts a page shared by N processes as 1/N in each, so the
sum is the tree's real footprint, and memory-mapped site data is counted once.

    python bench/sim_scale.py --sites 10 100 1000 --rounds 4 [--compare-shared 1000]

Time per round is the median of rounds 2..R (round 1 also starts the actors).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _memory(pids: list[int]) -> tuple[int, int]:
    """(PSS, RSS) in bytes summed over ``pids``."""
    pss = rss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return pss, rss


def run_point(sites: int, *, rounds: int, per_site: int, shared: bool, out: Path) -> dict:
    overrides = [
        "simulation.runtime=ray", "privacy=none", "secagg=off", "serving.enabled=false",
        "partition=iid", "model=mlp", f"dataset.num_samples={sites * per_site}",
        f"federation.num_sites={sites}", f"federation.rounds={rounds}",
        "federation.fraction_train=0.02", "federation.fraction_evaluate=0.02",
        "federation.local_epochs=1", "simulation.progress=false",
        f"simulation.shared_data={str(shared).lower()}", f"hydra.run.dir={out}",
    ]
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fedinfer.cli", "simulate", *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"pss": 0, "rss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pss, rss = _memory(_tree(proc.pid))
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{sites} sites failed:\n{stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    durations = [r["duration_s"] for r in results["rounds"]]
    trained = [len(r.get("sites", {})) for r in results["rounds"]]
    return {
        "sites": sites, "shared_data": shared, "rounds": len(durations),
        "round_s": statistics.median(durations[1:] or durations),
        "first_round_s": durations[0], "sites_per_round": max(trained),
        "wall_s": time.perf_counter() - started,
        "peak_pss_mib": peak["pss"] / 2**20, "peak_rss_mib": peak["rss"] / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-site", type=int, default=60, help="samples per site")
    parser.add_argument("--compare-shared", type=int, nargs="*", default=[],
                        help="also run these site counts with simulation.shared_data=false")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sim-scale-") as tmp:
        points = [(n, True) for n in args.sites] + [(n, False) for n in args.compare_shared]
        for i, (sites, shared) in enumerate(points):
            row = run_point(sites, rounds=args.rounds, per_site=args.per_site, shared=shared,
                            out=Path(tmp) / str(i))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| sites | shared data | sites per round | s per round (median of 2..R) | first round s "
          "| peak PSS MiB | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['sites']} | {r['shared_data']} | {r['sites_per_round']} | {r['round_s']:.2f} "
            f"| {r['first_round_s']:.2f} | {r['peak_pss_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
