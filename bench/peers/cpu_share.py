"""Does the site server lose to TorchServe on a busy box because it waits for a CPU?

fedinfer's site server and TorchServe (its venv from ``peers_bench.py setup``) serve the
same ONNX model; 64 connections send 1-row binary requests, interleaved, first on the
box as it is, then with ``--burn`` busy-loop processes competing for the CPUs. For the
server's whole process tree (every thread of every process) it reads the scheduler's
own accounting (``/proc/<pid>/task/<tid>/schedstat``): seconds *running* and seconds
*runnable but waiting for a CPU*, per second of wall time. A server that waits far
longer than it runs is starved of CPU, not slow or idle.

    python bench/peers/cpu_share.py --burn 3 -> bench/results/serving_cpu_share.md

``--workers 1,2`` also runs ``fedinfer serve --workers 2`` (``fedinfer-w2``) side by side
with the single-process server, and ``--concurrency 16,64`` several connection counts;
``--no-torchserve`` leaves TorchServe out (when its venv cannot be set up). A summary
table gives each server's median req/s per cell and the ratios to ``fedinfer``.

    python bench/peers/cpu_share.py --burn 3 --workers 1,2 --concurrency 16,64 \
        --out bench/results/serving_workers.md

The burners run for about a minute in all; the box is shared, so keep ``--reps`` small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(HERE)]

import numpy as np  # noqa: E402
import peers_bench as pb  # noqa: E402

COMMAND = "python bench/peers/cpu_share.py"


def _tree(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    found, todo = set(), [pid]
    while todo:
        proc = todo.pop()
        found.add(proc)
        try:
            for tid in os.listdir(f"/proc/{proc}/task"):
                children = Path(f"/proc/{proc}/task/{tid}/children").read_text().split()
                todo += [int(c) for c in children]
        except OSError:
            continue
    return found


def _sched(pids: set[int]) -> tuple[float, float, int]:
    """Seconds running, seconds waiting for a CPU, and threads, summed over ``pids``."""
    run = wait = threads = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                ran, waited, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
                run, wait, threads = run + int(ran), wait + int(waited), threads + 1
        except OSError:
            continue
    return run / 1e9, wait / 1e9, threads


def measure(server: pb.Running, args: argparse.Namespace, concurrency: int) -> dict:
    """One closed-loop run against ``server`` with its scheduler time around it."""
    pids = _tree(server.pid)
    run0, wait0, threads = _sched(pids)
    started, load = time.monotonic(), os.getloadavg()[0]
    argv = [
        sys.executable, str(ROOT / "bench" / "serving_loadgen.py"), "--url", server.url,
        "--model", pb.MODEL_NAME, "--input-dim", str(pb.INPUT_DIM), "--concurrency",
        str(concurrency), "--duration", str(args.duration), "--warmup", "0.5",
        "--peer", server.peer, "--format", "binary", "--server-pid", str(server.pid),
    ]  # fmt: skip
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    run1, wait1, _ = _sched(pids)
    wall = time.monotonic() - started
    return {
        "server": server.name,
        "concurrency": concurrency,
        "rps": out["rps"],
        "p99_ms": out["p99_ms"],
        "non_200": out["requests"] - out["ok"],
        "cpu_ms_per_req": out["cpu_ms_per_req"],
        "run_per_s": (run1 - run0) / wall,
        "wait_per_s": (wait1 - wait0) / wall,
        "threads": threads,
        "load1": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burn", type=int, default=3, help="busy-loop processes (default: 3)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", type=_ints, default=(64,), help="e.g. 16,64")
    parser.add_argument(
        "--workers", type=_ints, default=(1,), help="fedinfer serve --workers, e.g. 1,2"
    )
    parser.add_argument("--no-torchserve", action="store_true", help="fedinfer servers only")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "serving_cpu_share.md"
    )
    args = parser.parse_args()
    peers = [] if args.no_torchserve else [pb.PEERS["torchserve"]]
    if peers and pb.setup(peers[0]):
        sys.exit("TorchServe's venv could not be set up; run peers_bench.py setup")
    work = Path(tempfile.mkdtemp(prefix="fedinfer-cpu-share-"))
    model = pb.build_models(argparse.Namespace(models=["mlp"], samples=3000, epochs=5), work)
    failures: dict[str, str] = {}
    servers = pb.start_all(model["mlp"], peers, work, failures, 120.0, args.workers)
    rows: list[dict] = []
    try:
        if failures:
            sys.exit(f"TorchServe did not start: {failures}")
        for burn in (0, args.burn):
            burners = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burn)
            ]
            try:
                time.sleep(1.0)
                for concurrency in args.concurrency:
                    for rep in range(args.reps):
                        for server in servers:  # interleaved
                            row = {"burn": burn, "rep": rep, **measure(server, args, concurrency)}
                            rows.append(row)
                            print(json.dumps(row), flush=True)
            finally:
                for proc in burners:
                    proc.kill()
                    proc.wait()
    finally:
        for server in servers:
            server.stop()
    _write(args, rows)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _summary(rows: list[dict]) -> list[str]:
    """Median req/s per (busy loops, connections, server), and ratios to ``fedinfer``."""
    cells: dict[tuple[int, int], dict[str, list[dict]]] = {}
    for r in rows:
        cells.setdefault((r["burn"], r["concurrency"]), {}).setdefault(r["server"], []).append(r)
    names = list(dict.fromkeys(r["server"] for r in rows))
    lines = [
        "## Summary (medians over the reps)",
        "",
        "| busy loops | conn. | " + " | ".join(f"{n} req/s" for n in names)
        + " | " + " | ".join(f"{n} / fedinfer" for n in names if n != "fedinfer")
        + " | " + " | ".join(f"{n} wait/s" for n in names) + " |",
        "|---:|---:|" + "---:|" * (3 * len(names) - 1),
    ]  # fmt: skip
    for (burn, conc), by_server in sorted(cells.items()):
        rps = {n: float(np.median([r["rps"] for r in by_server[n]])) for n in names}
        wait = {n: float(np.median([r["wait_per_s"] for r in by_server[n]])) for n in names}
        ratios = [f"{rps[n] / rps['fedinfer']:.2f}x" for n in names if n != "fedinfer"]
        lines.append(
            f"| {burn} | {conc} | " + " | ".join(f"{rps[n]:,.0f}" for n in names)
            + " | " + " | ".join(ratios) + " | " + " | ".join(f"{wait[n]:.2f}" for n in names)
            + " |"
        )  # fmt: skip
    return lines


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    lines = [
        "# Running or waiting: the site server and TorchServe on a busy box",
        "",
        f"Command: `{' '.join([COMMAND, *sys.argv[1:]])}`. mlp (ONNX), "
        f"{'/'.join(map(str, args.concurrency))} connections, 1-row binary requests, "
        f"{args.duration:g} s runs, servers interleaved (`fedinfer-wN`: `fedinfer serve "
        "--workers N`). "
        "run/s and wait/s: seconds the server's threads spent running, and runnable but "
        "waiting for a CPU, per second of wall time (from /proc/*/task/*/schedstat, summed "
        f"over every thread of the server's process tree). {os.cpu_count()} CPUs, shared.",
        "",
        *_summary(rows),
        "",
        "## Every run",
        "",
        "| busy loops | conn. | rep | server | threads | load1 | req/s | p99 ms | non-200 | "
        "CPU ms/req | run/s | wait/s |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['burn']} | {r['concurrency']} | {r['rep']} | {r['server']} | {r['threads']} | "
            f"{r['load1']:.1f} | {r['rps']:,.0f} | {r['p99_ms']:.1f} | {r['non_200']} | "
            f"{r['cpu_ms_per_req']:.3f} | {r['run_per_s']:.2f} | {r['wait_per_s']:.2f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
