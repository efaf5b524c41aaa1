"""Site inference server benchmark -> bench/results/serving.md.

Trains small mlp and cnn1d models on MNIST-1D (generated locally), publishes
them as signed artifacts, then measures

1. backends in-process (torch eager / int8 dynamic / ONNX Runtime): test accuracy,
   forward latency at batch 1 and 64, batched throughput;
2. the real server (``fedinfer serve`` in a subprocess) under closed-loop load from a
   SECOND process (bench/serving_loadgen.py) on loopback: throughput, p50/p99 latency
   and server CPU-seconds per request at concurrency 1/16/64, batching on vs off;
3. server throughput as a fraction of in-process batched forward throughput.

    python bench/serving_bench.py            # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving_loadgen import tree_cpu_seconds  # noqa: E402

from fedinfer.artifacts import (  # noqa: E402
    ModelStore,
    generate_signing_key,
    weights_from_module,
    write_artifact,
)
from fedinfer.config.schema import ModelConfig  # noqa: E402
from fedinfer.models import build_model  # noqa: E402
from fedinfer.serving import DEFAULT_BACKEND  # noqa: E402
from fedinfer.serving.backends import build_backend  # noqa: E402
from fedinfer.serving.launch import SiteServer  # noqa: E402
from fedinfer.serving.model_manager import run_outputs  # noqa: E402

MODELS = {
    "mlp": ModelConfig(name="mlp", hidden_sizes=[128, 64]),
    "cnn1d": ModelConfig(name="cnn1d", channels=32, groups=8),
}
COMMAND = "python bench/serving_bench.py"
NOTES = """## How to read this

- Requests carry 1 row, so the server's cost is per *request*, not per row: about 0.2 ms
  of server CPU per request with batching on (HTTP parsing in uvicorn/httptools, two
  loopback writes per response, OIP decode and validation, audit line, metrics, response
  encoding), against a forward pass of 0.03-0.08 ms per row (ONNX Runtime, batch 1).
  Forward passes that take under 0.2 ms run on the event loop (no thread hand-off), with
  batching on or off alike. The CPU ratio on/off is the stable number on this shared box,
  while req/s medians swing with other jobs. The 3x throughput target for batching at
  c=64 is NOT met (1.4-1.5x, see Derived): with batching off the server now pays only
  the forward pass per request (0.03-0.08 ms) on top of ~0.16 ms of HTTP and protocol
  work, so batching can save at most that forward share. Earlier runs showed 2.8-3.5x
  only because the batcher timed its forward passes around the thread hand-off, so under
  load a fast model never moved onto the event loop and every unbatched request paid a
  ~0.35 ms hand-off; fixing that made batching-off 2.4x faster and batching-on 10%.
- The fraction of in-process forward throughput is tiny for 1-row requests for the same
  reason; with 64-row requests the server moves several times more rows per second.
- Default backend: ONNX Runtime (lowest batch-1 and batch-64 latency for both models,
  accuracy identical to torch). int8 dynamic quantization only quantizes Linear layers
  and is slower than float on these small models; it is kept for larger MLP heads.
- p99 at c=64 includes queueing behind up to 63 other requests on a 2-core box that also
  runs the load generator (and, during this run, other people's jobs).
- Against TorchServe, PyTriton, MLServer, KServe and LitServe on the same model and
  machine: bench/results/serving_peers.md (python bench/peers/peers_bench.py).
"""


def mnist1d(num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    data = make_dataset(args)
    return (
        data["x"].astype(np.float32),
        data["y"].astype(np.int64),
        data["x_test"].astype(np.float32),
        data["y_test"].astype(np.int64),
    )


def train(cfg: ModelConfig, x: np.ndarray, y: np.ndarray, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg, input_dim=x.shape[1], num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def publish_trained(
    work: Path,
    name: str,
    module: torch.nn.Module,
    cfg: ModelConfig,
    key,
    *,
    run_id: str,
    model_name: str = "mnist1d",
) -> ModelStore:
    """Sign ``module`` as version 1 of ``model_name`` and publish it to ``work/name/models``."""
    art = write_artifact(
        work / "artifacts" / name,
        weights=weights_from_module(module),
        model_cfg=cfg,
        input_dim=40,
        num_classes=10,
        version=1,
        server_round=1,
        metrics={},
        privacy={},
        run_id=run_id,
        signing_key=key,
        name=model_name,
    )
    store = ModelStore(work / name / "models")
    store.publish(art, public_key=key.public_key())
    return store


def time_forward(fn, x: np.ndarray, repeats: int) -> float:
    """Median seconds per call."""
    for _ in range(5):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def backend_table(stores: dict[str, ModelStore], x_test, y_test) -> list[dict[str, object]]:
    rows = []
    for model_name, store in stores.items():
        weights, manifest = store.load()
        float_acc = None
        for name in ("torch", "int8", "onnx"):
            backend = build_backend(name, weights, manifest, threads=1)
            acc = float((backend.predict(x_test).argmax(1) == y_test).mean())
            float_acc = acc if name == "torch" else float_acc
            forward = functools.partial(run_outputs, backend)
            b1 = time_forward(forward, x_test[:1], 300)
            b64 = time_forward(forward, x_test[:64], 100)
            rows.append(
                {
                    "model": model_name,
                    "backend": name,
                    "accuracy": acc,
                    "drop": (float_acc or acc) - acc,
                    "b1_ms": b1 * 1e3,
                    "b64_ms": b64 * 1e3,
                    "rows_per_s_b64": 64 / b64,
                }
            )
    return rows


def cpu_seconds(pid: int) -> float:
    """utime + stime of the server's process tree (``fedinfer serve --workers N``: all N)."""
    return tree_cpu_seconds(pid)


def served_ok(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", trust_env=False).text
    for line in text.splitlines():
        if line.startswith('fedinfer_requests_total{endpoint="infer",status="200"}'):
            return float(line.split()[-1])
    return 0.0


def load_run(
    server: SiteServer, model: str, concurrency: int, duration: float, rows: int = 1
) -> dict:
    before_cpu, before_n = cpu_seconds(server.pid or 0), served_ok(server.url)
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "serving_loadgen.py"),
            "--url",
            server.url,
            "--model",
            model,
            "--input-dim",
            "40",
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--warmup",
            "1",
            "--rows",
            str(rows),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout)
    cpu = cpu_seconds(server.pid or 0) - before_cpu
    served = served_ok(server.url) - before_n
    result["cpu_ms_per_req"] = 1e3 * cpu / max(served, 1)
    return result


@contextlib.contextmanager
def started(servers: Sequence[SiteServer]) -> Iterator[Sequence[SiteServer]]:
    """Start every server (an idle one costs ~nothing); stop them all on the way out."""
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def interleaved_medians(
    servers: Sequence[SiteServer],
    model: str,
    concurrency: int,
    duration: float,
    reps: int,
    rows: int = 1,
) -> list[dict]:
    """Median of ``reps`` runs per server, the runs rotating through the servers.

    Slow drift in a shared box's load then hits every server alike instead of
    whichever happened to run last.
    """
    samples: list[list[dict]] = [[] for _ in servers]
    for _ in range(reps):
        for i, server in enumerate(servers):
            samples[i].append(load_run(server, model, concurrency, duration, rows))
    return [_median_run(s) for s in samples]


def server_runs(
    stores: dict[str, ModelStore], duration: float, backends: list[str], reps: int
) -> list[dict]:
    """Median of ``reps`` interleaved runs per configuration (:func:`interleaved_medians`)."""
    results = []
    for model_name, store in stores.items():
        configs = [(b, on) for b in backends for on in (True, False) if on or b == DEFAULT_BACKEND]
        servers = [
            SiteServer(
                store.root,
                backend=b,
                max_batch_size=64 if on else 1,
                log_file=store.root.parent / f"serve-{b}-{on}.log",
            )
            for b, on in configs
        ]
        model = store.manifest().name
        with started(servers):
            for c in (1, 16, 64):
                medians = interleaved_medians(servers, model, c, duration, reps)
                for r, (backend, batching) in zip(medians, configs, strict=True):
                    r.update(model=model_name, backend=backend, batching=batching)
                    results.append(r)
                    print(json.dumps(r), flush=True)
            # Requests of 64 rows each: how close the server gets to the bare forward pass
            # once per-request HTTP cost is spread over many rows.
            (big,) = interleaved_medians(servers[:1], model, 16, duration, reps, rows=64)
            big.update(model=model_name, backend=configs[0][0], batching=True)
            results.append(big)
            print(json.dumps(big), flush=True)
    return results


def _median_run(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req"):
        out[key] = float(np.median([r[key] for r in runs]))
    out["rps_all"] = [round(r["rps"]) for r in runs]
    out["statuses"] = {}
    for r in runs:
        for k, v in r["statuses"].items():
            out["statuses"][k] = out["statuses"].get(k, 0) + v
    return out


def write_report(path: Path, *, meta: dict, backends: list[dict], runs: list[dict]) -> None:
    lines = [
        "# Site inference server: throughput, latency, CPU, backends",
        "",
        f"Command: `{COMMAND}` (from the repository root; writes this file).",
        "",
        f"Machine: {meta['cpus']} CPUs ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, Python {platform.python_version()}. Load average at start "
        f"{meta['load_start']}, at end {meta['load_end']}: the box is SHARED with other jobs, "
        "so absolute numbers are noisy; ratios measured back to back are more telling.",
        "",
        f"Models trained for this run on MNIST-1D ({meta['train']} train / {meta['test']} test "
        "samples, input 40, 10 classes). Load: closed loop, each request 1 row, binary tensor "
        "extension (like tritonclient), from a second process on loopback "
        f"(bench/serving_loadgen.py), {meta['duration']} s measured after 1 s warm-up; every "
        f"cell is the MEDIAN of {meta['reps']} interleaved runs (all req/s samples in the last "
        "column). Server (`--threads 1`) and load generator share the same CPUs.",
        "",
        "## Backends in-process (forward + softmax/argmax, median)",
        "",
        "| model | backend | test accuracy | drop vs float | batch 1 ms | batch 64 ms "
        "| rows/s @64 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for b in backends:
        lines.append(
            f"| {b['model']} | {b['backend']} | {b['accuracy']:.4f} | "
            f"{b['drop']:+.4f} | {b['b1_ms']:.3f} | {b['b64_ms']:.3f} | "
            f"{b['rows_per_s_b64']:,.0f} |"
        )
    lines += [
        "",
        "## Server under load",
        "",
        "| model | backend | batching | concurrency | rows/req | req/s | p50 ms | p99 ms | "
        "server CPU ms/req | non-200 | req/s samples |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        bad = sum(v for k, v in r["statuses"].items() if str(k) != "200")
        lines.append(
            f"| {r['model']} | {r['backend']} | {'on' if r['batching'] else 'off'} | "
            f"{r['concurrency']} | {r['rows']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['cpu_ms_per_req']:.3f} | {bad} | "
            f"{', '.join(str(v) for v in r['rps_all'])} |"
        )
    lines += ["", "## Derived", ""]
    for model in MODELS:
        on = _find(runs, model, DEFAULT_BACKEND, True, 64)
        off = _find(runs, model, DEFAULT_BACKEND, False, 64)
        big = _find(runs, model, DEFAULT_BACKEND, True, 16, rows=64)
        fwd = next(b for b in backends if b["model"] == model and b["backend"] == DEFAULT_BACKEND)
        if on and off and big:
            lines.append(
                f"- {model}: batching on vs off at c=64: {on['rps'] / off['rps']:.1f}x median "
                f"throughput ({on['rps']:,.0f} vs {off['rps']:,.0f} req/s), "
                f"{off['cpu_ms_per_req'] / on['cpu_ms_per_req']:.1f}x less server CPU per "
                f"request ({on['cpu_ms_per_req']:.3f} vs {off['cpu_ms_per_req']:.3f} ms), p99 "
                f"{on['p99_ms']:.1f} vs {off['p99_ms']:.1f} ms."
            )
            lines.append(
                f"- {model}: 1-row requests at c=64 reach {on['rps'] / fwd['rows_per_s_b64']:.1%}"
                f" of in-process batched ({DEFAULT_BACKEND}, batch 64) forward throughput "
                f"({fwd['rows_per_s_b64']:,.0f} rows/s); 64-row requests at c=16 reach "
                f"{big['rps'] * 64 / fwd['rows_per_s_b64']:.0%} "
                f"({big['rps'] * 64:,.0f} rows/s)."
            )
    lines.append(NOTES)
    path.write_text("\n".join(lines))


def _find(
    runs: list[dict], model: str, backend: str, batching: bool, c: int, rows: int = 1
) -> dict | None:
    return next(
        (
            r
            for r in runs
            if r["model"] == model
            and r["backend"] == backend
            and r["batching"] == batching
            and r["concurrency"] == c
            and r["rows"] == rows
        ),
        None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--also-backend",
        action="append",
        default=["torch"],
        help="extra server backends measured with batching on",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the server runs it (`fedinfer serve --threads 1`)
    meta = {
        "cpus": os.cpu_count(),
        "load_start": round(os.getloadavg()[0], 1),
        "duration": args.duration,
        "reps": args.reps,
    }
    x, y, x_test, y_test = mnist1d(args.samples)
    meta.update(train=len(x), test=len(x_test))
    key = generate_signing_key()
    tmp = Path(tempfile.mkdtemp(prefix="fedinfer-bench-"))
    stores = {}
    for name, cfg in MODELS.items():
        model = train(cfg, x, y, args.epochs)
        stores[name] = publish_trained(tmp, name, model, cfg, key, run_id="bench")
    backends = backend_table(stores, x_test, y_test)
    print(json.dumps(backends, indent=1), flush=True)
    extra = [b for b in args.also_backend if b != DEFAULT_BACKEND]
    runs = server_runs(stores, args.duration, [DEFAULT_BACKEND, *extra], args.reps)
    meta["load_end"] = round(os.getloadavg()[0], 1)
    write_report(args.out, meta=meta, backends=backends, runs=runs)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
