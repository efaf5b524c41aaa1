"""Dynamic batching on a model whose forward pass costs more than HTTP -> serving_batching_heavy.md.

bench/serving_bench.py measures small models whose forward pass (0.03-0.08 ms) is cheaper than
the server's per-request HTTP and protocol work (~0.2 ms), so batching can save little there.
Here the models are wide MLPs (input 40, 10 classes) whose batch-1 forward pass costs up to
milliseconds, mostly reading weights larger than the CPU's cache: a batch of 64 rows reads
them once. The question
is how much of that the server's dynamic batcher turns into throughput under load.

For each model: in-process forward time at batch 1 and 64 (the backend the server uses),
then the real server (``fedinfer serve`` in a subprocess, one inference thread) under
closed-loop load from a second process (bench/serving_loadgen.py, 1-row requests, 64
keep-alive connections): ``--max-batch-size 64`` (batching on) against ``1`` (off). The two
servers run side by side and the runs interleave; each cell is the median of ``--reps``.

    python bench/serving_batching_heavy.py          # ~4 min on 2 cores

Weights are random (throughput does not depend on their values); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving_bench import interleaved_medians, publish_trained, started  # noqa: E402

from fedinfer.artifacts import generate_signing_key  # noqa: E402
from fedinfer.config.schema import ModelConfig  # noqa: E402
from fedinfer.models import build_model, count_parameters  # noqa: E402
from fedinfer.serving import DEFAULT_BACKEND  # noqa: E402
from fedinfer.serving.backends import build_backend  # noqa: E402
from fedinfer.serving.launch import SiteServer  # noqa: E402
from fedinfer.serving.model_manager import run_outputs  # noqa: E402

MODELS = {
    # 8.6 MB of weights: fits the L3 cache; its forward pass costs about what HTTP does.
    "mlp-1024x3": ModelConfig(name="mlp", hidden_sizes=[1024, 1024, 1024]),
    # 34 MB and 68 MB: batch-1 forward passes of milliseconds, bound by reading the weights.
    "mlp-2048x3": ModelConfig(name="mlp", hidden_sizes=[2048, 2048, 2048]),
    "mlp-4096x2": ModelConfig(name="mlp", hidden_sizes=[4096, 4096]),
}
COMMAND = "python bench/serving_batching_heavy.py"
CONCURRENCY = 64


def cpu_forward(fn, x: np.ndarray, repeats: int) -> float:
    """Median CPU seconds of this thread per call (wall time swings with a shared box's load).

    The backend runs on the calling thread (one intra-op thread), so its thread CPU time is
    the forward pass's cost, including stalls on memory.
    """
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.thread_time()
        fn(x)
        times.append(time.thread_time() - t)
    return float(np.median(times))


def forward_table(stores: dict, backend_name: str) -> list[dict]:
    """In-process forward CPU time of each model at batch 1 and 64 (median)."""
    rows = []
    x = np.random.default_rng(0).normal(size=(64, 40)).astype(np.float32)
    for name, store in stores.items():
        weights, manifest = store.load()
        backend = build_backend(backend_name, weights, manifest, threads=1)
        forward = functools.partial(run_outputs, backend)
        b1, b64 = cpu_forward(forward, x[:1], 200), cpu_forward(forward, x, 50)
        rows.append({"model": name, "b1_ms": b1 * 1e3, "b64_ms": b64 * 1e3,
                     "rows_per_s_b1": 1 / b1, "rows_per_s_b64": 64 / b64})  # fmt: skip
    return rows


def server_runs(stores: dict, *, backend: str, duration: float, reps: int) -> list[dict]:
    """Batching on vs off at c=64, servers side by side, runs interleaved, medians."""
    results = []
    for name, store in stores.items():
        servers = [
            SiteServer(store.root, backend=backend, max_batch_size=64 if on else 1,
                       log_file=store.root.parent / f"serve-{on}.log")
            for on in (True, False)
        ]  # fmt: skip
        with started(servers):
            medians = interleaved_medians(
                servers, store.manifest().name, CONCURRENCY, duration, reps
            )
        for run, on in zip(medians, (True, False), strict=True):
            run.update(model=name, backend=backend, batching=on)
            results.append(run)
            print(json.dumps(run), flush=True)
    return results


def write_report(path: Path, *, meta: dict, forward: list[dict], runs: list[dict]) -> None:
    lines = [
        "# Dynamic batching on models whose forward pass costs more than HTTP",
        "",
        f"Command: `{COMMAND}` (from the repository root; writes this file).",
        "",
        f"Machine: {meta['cpus']} CPUs ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, Python {platform.python_version()}; load average {meta['load_start']}"
        f" at start, {meta['load_end']} at end (a SHARED box: ratios measured side by side in one "
        "run are the numbers to read). Backend "
        f"`{meta['backend']}`, one inference thread (`fedinfer serve --threads 1`); server and "
        "load generator share the CPUs.",
        "",
        "## Forward pass in-process (median CPU time of the calling thread)",
        "",
        "| model | parameters | batch 1 ms | batch 64 ms | rows/s @1 | rows/s @64 | per-row gain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in forward:
        lines.append(
            f"| {f['model']} | {meta['params'][f['model']]:,} | {f['b1_ms']:.3f} | "
            f"{f['b64_ms']:.3f} | {f['rows_per_s_b1']:,.0f} | {f['rows_per_s_b64']:,.0f} | "
            f"{f['rows_per_s_b64'] / f['rows_per_s_b1']:.1f}x |"
        )
    lines += [
        "",
        f"## Server at {CONCURRENCY} connections, 1-row requests (median of {meta['reps']} "
        f"interleaved {meta['duration']:.0f} s runs)",
        "",
        "| model | batching | req/s | p50 ms | p99 ms | server CPU ms/req | non-200 | "
        "req/s samples |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        bad = sum(v for k, v in r["statuses"].items() if str(k) != "200")
        lines.append(
            f"| {r['model']} | {'on (64)' if r['batching'] else 'off (1)'} | {r['rps']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['cpu_ms_per_req']:.3f} | {bad} | "
            f"{', '.join(str(v) for v in r['rps_all'])} |"
        )
    lines += ["", "## Derived", ""]
    for name in MODELS:
        on = next(r for r in runs if r["model"] == name and r["batching"])
        off = next(r for r in runs if r["model"] == name and not r["batching"])
        lines.append(
            f"- {name}: batching on vs off at c={CONCURRENCY}: **{on['rps'] / off['rps']:.1f}x** "
            f"measured throughput ({on['rps']:,.0f} vs {off['rps']:,.0f} req/s, p99 "
            f"{on['p99_ms']:.1f} vs {off['p99_ms']:.1f} ms); **"
            f"{off['cpu_ms_per_req'] / on['cpu_ms_per_req']:.1f}x** less server CPU per request "
            f"({on['cpu_ms_per_req']:.3f} vs {off['cpu_ms_per_req']:.3f} ms), i.e. a CPU-bound "
            f"server core serves {1e3 / on['cpu_ms_per_req']:,.0f} vs "
            f"{1e3 / off['cpu_ms_per_req']:,.0f} req/s."
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
    parser.add_argument("--backend", default=DEFAULT_BACKEND)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "serving_batching_heavy.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the server runs it
    meta: dict = {"cpus": os.cpu_count(), "load_start": round(os.getloadavg()[0], 1),
                  "duration": args.duration, "reps": args.reps, "backend": args.backend,
                  "params": {}}  # fmt: skip
    key = generate_signing_key()
    tmp = Path(tempfile.mkdtemp(prefix="fedinfer-bench-heavy-"))
    stores = {}
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        model = build_model(cfg, input_dim=40, num_classes=10).eval()
        meta["params"][name] = count_parameters(model)
        stores[name] = publish_trained(tmp, name, model, cfg, key, run_id="bench-heavy",
                                       model_name=name.replace("-", "_"))  # fmt: skip
    forward = forward_table(stores, args.backend)
    print(json.dumps(forward, indent=1), flush=True)
    runs = server_runs(stores, backend=args.backend, duration=args.duration, reps=args.reps)
    meta["load_end"] = round(os.getloadavg()[0], 1)
    write_report(args.out, meta=meta, forward=forward, runs=runs)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
