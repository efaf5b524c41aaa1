"""Does the site server lose to TorchServe on a busy box because it waits for a CPU?

fedinfer's site server and TorchServe (its venv from ``peers_bench.py setup``) serve the
same ONNX model; 64 connections send 1-row binary requests, interleaved, first on the
box as it is, then with ``--burn`` busy-loop processes competing for the CPUs. For the
server's whole process tree (every thread of every process) it reads the scheduler's
own accounting (``/proc/<pid>/task/<tid>/schedstat``): seconds *running* and seconds
*runnable but waiting for a CPU*, per second of wall time. A server that waits far
longer than it runs is starved of CPU, not slow or idle.

    python bench/peers/cpu_share.py --burn 3 -> bench/results/serving_cpu_share.md

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


def measure(server: pb.Running, args: argparse.Namespace) -> dict:
    """One closed-loop run against ``server`` with its scheduler time around it."""
    pids = _tree(server.pid)
    run0, wait0, threads = _sched(pids)
    started, load = time.monotonic(), os.getloadavg()[0]
    argv = [
        sys.executable, str(ROOT / "bench" / "serving_loadgen.py"), "--url", server.url,
        "--model", pb.MODEL_NAME, "--input-dim", str(pb.INPUT_DIM), "--concurrency",
        str(args.concurrency), "--duration", str(args.duration), "--warmup", "0.5",
        "--peer", server.peer, "--format", "binary", "--server-pid", str(server.pid),
    ]  # fmt: skip
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    run1, wait1, _ = _sched(pids)
    wall = time.monotonic() - started
    return {
        "server": server.name,
        "rps": out["rps"],
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
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "serving_cpu_share.md"
    )
    args = parser.parse_args()
    if pb.setup(pb.PEERS["torchserve"]):
        sys.exit("TorchServe's venv could not be set up; run peers_bench.py setup")
    work = Path(tempfile.mkdtemp(prefix="fedinfer-cpu-share-"))
    model = pb.build_models(argparse.Namespace(models=["mlp"], samples=3000, epochs=5), work)
    failures: dict[str, str] = {}
    servers = pb.start_all(model["mlp"], [pb.PEERS["torchserve"]], work, failures, 120.0)
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
                for rep in range(args.reps):
                    for server in servers:  # interleaved
                        row = {"burn": burn, "rep": rep, **measure(server, args)}
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


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    lines = [
        "# Running or waiting: the site server and TorchServe on a busy box",
        "",
        f"Command: `{' '.join([COMMAND, *sys.argv[1:]])}`. mlp (ONNX), {args.concurrency} "
        f"connections, 1-row binary requests, {args.duration:g} s runs, servers interleaved. "
        "run/s and wait/s: seconds the server's threads spent running, and runnable but "
        "waiting for a CPU, per second of wall time (from /proc/*/task/*/schedstat, summed "
        f"over every thread of the server's process tree). {os.cpu_count()} CPUs, shared.",
        "",
        "| busy loops | rep | server | threads | load1 | req/s | CPU ms/req | run/s | wait/s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['burn']} | {r['rep']} | {r['server']} | {r['threads']} | {r['load1']:.1f} | "
            f"{r['rps']:,.0f} | {r['cpu_ms_per_req']:.3f} | {r['run_per_s']:.2f} | "
            f"{r['wait_per_s']:.2f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
