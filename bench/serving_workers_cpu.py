"""Where the CPU of `fedinfer serve --workers 2` goes, per request -> stdout (JSON lines).

Three probes on one small model (ONNX, 1-row binary requests, bench/serving_loadgen.py in a
second process), servers side by side and runs interleaved (``--reps``):

1. CPU ms per request of the whole server (parent + workers) for ``--workers 1`` at 8 and 16
   connections and ``--workers 2`` at 16 (each of its workers then holds about 8);
2. the parent's share alone (it relays the audit lines of both workers), and each worker's;
3. the metrics' own cost in-process: one request's counter, histogram and gauge updates with
   plain prometheus_client values and with its multiprocess (shared memory) values.

    python bench/serving_workers_cpu.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from artifact_factory import publish_versions  # noqa: E402
from serving_loadgen import tree_cpu_seconds  # noqa: E402

from fedinfer.artifacts import generate_signing_key  # noqa: E402
from fedinfer.serving.launch import SiteServer  # noqa: E402

_METRICS_PROBE = """
import os, sys, tempfile, time
if sys.argv[1] == "multiprocess":
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
from fedinfer.serving.metrics import ServingMetrics
m, n = ServingMetrics(), 100_000
t = time.process_time()
for _ in range(n):
    m.count_request("infer", 200)
    m.infer_latency.observe(0.001)
    m.queue_depth.set(0)
print(1e3 * (time.process_time() - t) / n)
"""


def process_cpu(pid: int) -> float:
    """utime + stime of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def run(server: SiteServer, concurrency: int, duration: float) -> dict:
    """One closed-loop run; CPU ms per request of the tree, the parent and each worker."""
    pid = server.pid or 0
    kids = children(pid)
    tree0, own0, kids0 = tree_cpu_seconds(pid), process_cpu(pid), [process_cpu(k) for k in kids]
    argv = [
        sys.executable, str(ROOT / "bench" / "serving_loadgen.py"), "--url", server.url,
        "--model", "digits", "--input-dim", "40", "--concurrency", str(concurrency),
        "--duration", str(duration), "--warmup", "0.3", "--format", "binary",
    ]  # fmt: skip
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    n = max(out["requests"], 1)
    return {
        "rps": out["rps"],
        "tree_ms": 1e3 * (tree_cpu_seconds(pid) - tree0) / n,
        "parent_ms": 1e3 * (process_cpu(pid) - own0) / n,
        "workers_ms": [1e3 * (process_cpu(k) - c) / n for k, c in zip(kids, kids0, strict=True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=2.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedinfer-workers-cpu-"))
    store = publish_versions(tmp, generate_signing_key(), [1])
    servers = {
        w: SiteServer(store.root, backend="onnx", workers=w, log_file=tmp / f"w{w}.log",
                      audit_dir=tmp / f"audit-w{w}")
        for w in (1, 2)
    }  # fmt: skip
    cells = ((1, 8), (1, 16), (2, 16))
    samples: dict[tuple[int, int], list[dict]] = {c: [] for c in cells}
    try:
        for server in servers.values():
            server.start()
        for _ in range(args.reps):
            for workers, conc in cells:
                samples[(workers, conc)].append(run(servers[workers], conc, args.duration))
    finally:
        for server in servers.values():
            server.stop()
    load = round(os.getloadavg()[0], 1)
    for (workers, conc), runs in samples.items():
        row = {
            "workers": workers,
            "connections": conc,
            "load1": load,
            "rps": [round(r["rps"]) for r in runs],
            "tree_ms_per_req": round(statistics.median(r["tree_ms"] for r in runs), 4),
            "parent_ms_per_req": round(statistics.median(r["parent_ms"] for r in runs), 4),
            "workers_ms_per_req": [[round(v, 4) for v in r["workers_ms"]] for r in runs],
        }
        print(json.dumps(row), flush=True)
    for mode in ("plain", "multiprocess"):
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", _METRICS_PROBE, mode], capture_output=True, text=True, check=True
        )
        print(json.dumps({"metrics": mode, "ms_per_request": round(float(done.stdout), 4),
                          "probe_s": round(time.monotonic() - started, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
