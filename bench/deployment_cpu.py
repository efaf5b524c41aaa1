"""Where the CPU of a steady deployed round goes, by process kind (issue 15 part 1).

A real ``fedinfer deploy local`` deployment (SuperLink, gateway, ServerApp, one SuperNode,
site worker and inference server per site). A sampler reads every process's CPU time
(``/proc/PID/stat``) every 0.25 s; the steady rounds are those between the end of round 2
and the end of the last round (the last site worker's "train replied" line in each round).
On a machine with fewer cores than busy processes a round cannot be shorter than its CPU
seconds divided by the cores: this says whether a deployed round waits or computes.

    python bench/deployment_cpu.py                      # 2 and 5 sites, secagg off and on
    python bench/deployment_cpu.py --configs 5:off      # -> results/deployment_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from deployment_latency import run_federation  # bench/ is on sys.path: run as a script

from fedinfer.deploy.local import LocalDeployment

RESULTS = Path(__file__).parent / "results"
_TICK = os.sysconf("SC_CLK_TCK")
# Command-line fragments of each process kind of a local deployment, most specific first.
KINDS = (
    ("site worker", "fedinfer.deploy.site_worker"),
    ("SuperNode", "fedinfer.deploy.supernode"),
    ("inference server", "fedinfer serve"),
    ("SuperLink", "flower-superlink"),
    ("gateway", "fedinfer.deploy.gateway"),
    ("ServerApp", "flwr-serverapp"),
    ("SuperExec", "flower-superexec"),
    ("coordinator", "fedinfer coordinator"),
    ("site supervisor", "fedinfer site"),
)

Snapshot = dict[int, tuple[str, float]]


def _kind(cmdline: str) -> str | None:
    return next((kind for kind, fragment in KINDS if fragment in cmdline), None)


def snapshot(marker: str) -> Snapshot:
    """CPU seconds so far of every deployment process whose command line mentions ``marker``
    (the ServerApp's does not: it is the only one of its kind on the machine)."""
    found: Snapshot = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            kind = _kind(cmdline)
            if kind is None or (marker not in cmdline and kind != "ServerApp"):
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            found[int(proc.name)] = (kind, (int(fields[11]) + int(fields[12])) / _TICK)
        except (OSError, ValueError):
            continue
    return found


def round_ends(workdir: Path) -> list[float]:
    """Wall time at which each round's last site worker replied to its train message."""
    ends: dict[int, float] = {}
    for log in workdir.glob("sites/*/logs/worker.log"):
        replies = [line for line in log.read_text().splitlines() if "train replied" in line]
        for i, line in enumerate(replies):
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            ends[i] = max(ends.get(i, 0.0), stamp)
    return [ends[i] for i in sorted(ends)]


def measure(sites: int, secagg: str, rounds: int, overrides: list[str]) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fedinfer-bench-cpu-"))
    extra = [f"site_policy.secagg_min_participants={sites}"] if secagg == "on" and sites < 3 else []
    deployment = LocalDeployment(
        workdir, num_sites=sites, rounds=rounds, overrides=[*overrides, f"secagg={secagg}", *extra]
    )
    samples: list[tuple[float, Snapshot]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), snapshot(str(workdir))))
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        coordinator_overrides = deployment.prepare()
        sampler.start()
        run_federation(deployment, coordinator_overrides)
        done.set()
        sampler.join()
        ends = round_ends(workdir)
    finally:
        done.set()
        deployment.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    first, last = ends[1], ends[-1]  # end of round 2 .. end of the last round
    steady = len(ends) - 2

    def at(stamp: float) -> Snapshot:
        return min(samples, key=lambda s: abs(s[0] - stamp))[1]

    before, after = at(first), at(last)
    per_kind: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        per_kind[kind] = per_kind.get(kind, 0.0) + cpu - before.get(pid, (kind, 0.0))[1]
    return {
        "sites": sites,
        "secagg": secagg,
        "steady_rounds": steady,
        "wall_per_round_s": (last - first) / steady,
        "cpu_per_round_s": sum(per_kind.values()) / steady,
        "by_kind": {k: v / steady for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
        "load": os.getloadavg()[0],
    }


def render(data: dict[str, Any]) -> str:
    kinds = [k for k, _ in KINDS if any(k in c["by_kind"] for c in data["configs"])]
    lines = [
        f"# CPU of a steady deployed round ({data['label']})",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Machine: {data['machine']}, {data['cores']} CPUs. CPU seconds per steady round "
        "(rounds 3..R, measured between the last site replies of round 2 and of round R), "
        "summed over the processes of each kind; `floor` = CPU / cores, the shortest round "
        "these CPU seconds allow on this machine.",
        "",
        "| sites | secagg | wall per round | CPU per round | floor | "
        + " | ".join(kinds)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(kinds),
    ]
    for c in data["configs"]:
        cells = [f"{c['by_kind'].get(k, 0.0):.2f}" for k in kinds]
        lines.append(
            f"| {c['sites']} | {c['secagg']} | {c['wall_per_round_s']:.1f} | "
            f"{c['cpu_per_round_s']:.1f} | {c['cpu_per_round_s'] / data['cores']:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--configs", default="2:off,5:off,5:on", help="comma-separated SITES:SECAGG (on/off)"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--label", default="deployment_cpu")
    parser.add_argument(
        "overrides", nargs="*", default=["dataset.num_samples=2000", "federation.local_epochs=1"]
    )
    args = parser.parse_args()
    if args.rounds < 4:
        raise SystemExit("--rounds: at least 4 (rounds 1-2 warm up; the rest are measured)")
    configs = []
    for item in args.configs.split(","):
        sites, secagg = item.split(":")
        print(f"-- {sites} sites, secagg {secagg}", flush=True)
        configs.append(measure(int(sites), secagg, args.rounds, args.overrides))
    data = {
        "label": args.label,
        "command": " ".join(["python bench/deployment_cpu.py", *sys.argv[1:]]),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "configs": configs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.label}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{args.label}.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
