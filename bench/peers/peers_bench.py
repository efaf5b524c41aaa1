"""fedinfer's site server against established inference servers -> bench/results/serving_peers.md.

For each peer (TorchServe, PyTriton, MLServer, KServe ModelServer, LitServe) this

1. creates an isolated virtual environment under ``bench/.peers/<peer>`` (gitignored)
   and pip-installs the peer at an exact pinned version (``torch==2.13.0``, the CPU
   build, where the peer needs torch); nothing of the peers is vendored here;
2. serves the SAME ONNX export of the same trained model (mlp and cnn1d on MNIST-1D,
   as bench/serving_bench.py trains them) through the peer's recommended custom-model
   path (bench/peers/servers/), with the peer's dynamic batching on where it has one,
   on loopback;
3. checks one answer against ONNX Runtime in-process, then measures it with the same
   closed-loop load generator as our server (bench/serving_loadgen.py, a second
   process): req/s, rows/s, p50/p99, server CPU-seconds per request (utime+stime of the
   server's whole process tree), non-200 count. Runs are interleaved (every server
   once per repetition, in rotation) and each cell is the median of ``--reps``.

    python bench/peers/peers_bench.py                  # setup (first time) + ~20 min of runs
    python bench/peers/peers_bench.py setup            # only create/refresh the venvs

A peer that cannot install or start here is reported with the reason; the rest run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import serving_loadgen as loadgen  # noqa: E402

from fedinfer.serving import DEFAULT_MAX_BATCH_SIZE  # noqa: E402

HERE = Path(__file__).resolve().parent
SERVERS = HERE / "servers"
VENVS = ROOT / "bench" / ".peers"
MODEL_NAME = "mnist1d"
INPUT_DIM, CLASSES, MAX_BATCH = 40, 10, 64
ORT = "onnxruntime==1.32.0"  # the version fedinfer's own venv runs
COMMAND = "python bench/peers/peers_bench.py"


@dataclass(frozen=True)
class Launch:
    """How to start one server: argv, extra environment, working directory."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


@dataclass(frozen=True)
class Peer:
    """One peer server: what to install, how to start it, what it speaks."""

    name: str
    label: str
    packages: tuple[str, ...]
    formats: tuple[str, ...]
    batching: str
    """How its batching is configured here (or why there is none)."""
    launch: Callable[[Path, Path, int, Path], Launch]
    """``(venv, onnx file, port, work dir) -> Launch``."""
    version_of: tuple[str, ...]


def _py(venv: Path, script: str, onnx: Path, port: int) -> list[str]:
    return [
        str(venv / "bin" / "python"),
        str(SERVERS / script),
        str(onnx),
        str(port),
        MODEL_NAME,
        str(INPUT_DIM),
        str(CLASSES),
        str(MAX_BATCH),
    ]


def _launch_pytriton(venv: Path, onnx: Path, port: int, work: Path) -> Launch:
    # Triton's Python-backend stub links libpython3.11.so by soname; without this it can
    # load the OS's libpython (another 3.11.x) under this interpreter's stdlib and fail.
    libdir = sysconfig.get_config_var("LIBDIR")
    env = {"LD_LIBRARY_PATH": f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    return Launch(_py(venv, "pytriton_server.py", onnx, port), env=env, cwd=work)


def _launch_kserve(venv: Path, onnx: Path, port: int, work: Path) -> Launch:
    return Launch(_py(venv, "kserve_server.py", onnx, port), cwd=work)


def _launch_litserve(venv: Path, onnx: Path, port: int, work: Path) -> Launch:
    return Launch(_py(venv, "litserve_server.py", onnx, port), cwd=work)


def _launch_mlserver(venv: Path, onnx: Path, port: int, work: Path) -> Launch:
    folder = work / "mlserver"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("mlserver_model.py", "ort_model.py"):
        shutil.copy(SERVERS / name, folder / name)
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": port + 1,
        "metrics_port": port + 2,
        "debug": False,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": MODEL_NAME,
        "implementation": "mlserver_model.OnnxModel",
        "max_batch_size": MAX_BATCH,
        "max_batch_time": 0.001,
        "parameters": {"uri": str(onnx)},
    }
    (folder / "model-settings.json").write_text(json.dumps(model_settings))
    return Launch(
        [str(venv / "bin" / "mlserver"), "start", str(folder)],
        env={"PATH": f"{venv / 'bin'}:{os.environ['PATH']}"},
        cwd=folder,
    )


def _launch_torchserve(venv: Path, onnx: Path, port: int, work: Path) -> Launch:
    folder = work / "torchserve"
    store = folder / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    bin_ = venv / "bin"
    subprocess.run(
        [
            str(bin_ / "torch-model-archiver"),
            "--model-name",
            MODEL_NAME,
            "--version",
            "1.0",
            "--serialized-file",
            str(onnx),
            "--handler",
            str(SERVERS / "torchserve_handler.py"),
            "--extra-files",
            str(SERVERS / "ort_model.py"),
            "--export-path",
            str(store),
            "--force",
        ],
        check=True,
        capture_output=True,
    )
    models = {
        MODEL_NAME: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{MODEL_NAME}.mar",
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": MAX_BATCH,
                "maxBatchDelay": 1,
                "responseTimeout": 120,
            }
        }
    }
    config = [
        f"inference_address=http://127.0.0.1:{port}",
        f"management_address=http://127.0.0.1:{port + 1}",
        f"metrics_address=http://127.0.0.1:{port + 2}",
        f"model_store={store}",
        f"load_models={MODEL_NAME}.mar",
        f"models={json.dumps(models)}",
        "disable_token_authorization=true",
        "install_py_dep_per_model=false",
        "job_queue_size=1000",
        "default_workers_per_model=1",
    ]
    (folder / "config.properties").write_text("\n".join(config) + "\n")
    return Launch(
        [
            str(bin_ / "torchserve"),
            "--start",
            "--foreground",
            "--ncs",
            "--disable-token-auth",
            "--ts-config",
            str(folder / "config.properties"),
            "--model-store",
            str(store),
        ],
        env={
            "PATH": f"{bin_}:{os.environ['PATH']}",
            "LOG_LOCATION": str(folder / "logs"),
            "METRICS_LOCATION": str(folder / "logs"),
            "FEDINFER_BENCH_INPUT_DIM": str(INPUT_DIM),
        },
        cwd=folder,
    )


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer(
            "torchserve",
            "TorchServe 0.12.0 (Java 17 frontend, 1 Python worker)",
            (
                "torchserve==0.12.0",
                "torch-model-archiver==0.12.0",
                "torch==2.13.0",
                "pyyaml",
                ORT,
                "numpy",
                "psutil",
            ),
            ("json", "binary"),
            "frontend batching: batchSize 64, maxBatchDelay 1 ms",
            _launch_torchserve,
            ("torchserve", "torch-model-archiver", "torch", "onnxruntime"),
        ),
        Peer(
            "triton",
            "PyTriton 0.7.0 (bundled Triton server, Python model over its proxy)",
            ("nvidia-pytriton==0.7.0", ORT),
            ("json", "binary"),
            "Triton dynamic batcher: max_batch_size 64, max_queue_delay 0 us",
            _launch_pytriton,
            ("nvidia-pytriton", "tritonclient", "onnxruntime"),
        ),
        Peer(
            "mlserver",
            "MLServer 1.7.1 (custom MLModel runtime, default parallel workers)",
            # uvloop >= 0.22 raises in asyncio.get_event_loop() without a loop, which
            # MLServer 1.7.1's parallel inference worker calls at start-up.
            ("mlserver==1.7.1", "uvloop==0.21.0", ORT),
            ("json",),
            "adaptive batching: max_batch_size 64, max_batch_time 1 ms",
            _launch_mlserver,
            ("mlserver", "fastapi", "uvicorn", "onnxruntime"),
        ),
        Peer(
            "kserve",
            "KServe ModelServer 0.21.0 (kserve.Model, 1 uvicorn worker)",
            ("kserve==0.21.0", ORT),
            ("json", "binary"),
            "none (KServe batches in a separate agent container, not in ModelServer)",
            _launch_kserve,
            ("kserve", "fastapi", "uvicorn", "onnxruntime"),
        ),
        Peer(
            "litserve",
            "LitServe 0.2.19 (LitAPI, 1 worker)",
            ("litserve==0.2.19", ORT),
            ("json",),
            "max_batch_size 64, batch_timeout 1 ms",
            _launch_litserve,
            ("litserve", "fastapi", "uvicorn", "onnxruntime"),
        ),
    )
}


# ------------------------------------------------------------------------ setup
def setup(peer: Peer) -> str | None:
    """Create/refresh the peer's venv; return None, or why it could not be installed."""
    venv = VENVS / peer.name
    marker = venv / ".fedinfer-spec"
    spec = "\n".join(peer.packages)
    if marker.exists() and marker.read_text() == spec:
        return None
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *peer.packages],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        errors = [ln for ln in done.stderr.splitlines() if "ignored: it is neither" not in ln]
        return "pip install failed: " + " ".join(errors[-5:])
    torch = _installed(venv, ("torch",)).get("torch", "")
    if torch and "+cpu" not in torch:
        return f"pip resolved a non-CPU torch build ({torch}); refusing to use it"
    marker.write_text(spec)
    return None


def _installed(venv: Path, names: tuple[str, ...]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *names], capture_output=True, text=True
    )
    return json.loads(done.stdout) if done.returncode == 0 else {}


# -------------------------------------------------------------------- processes
def _free_port_block(size: int = 3) -> int:
    """A base port with ``size`` consecutive free ports on loopback."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size > 65535:
            continue
        try:
            for p in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports on loopback")


_STARTED: list[subprocess.Popen[bytes]] = []


def _on_signal(signum: int, _frame: object) -> None:
    """SIGTERM/SIGINT: unwind through the ``finally`` blocks that stop every server."""
    raise SystemExit(128 + signum)


def _kill_leftovers() -> None:
    for proc in _STARTED:
        _kill_group(proc)


class Running:
    """A started server: its process group, URL, and what it answers."""

    def __init__(self, name: str, peer: str, pid: int, url: str, stop: Callable[[], None]):
        self.name, self.peer, self.pid, self.url, self._stop = name, peer, pid, url, stop

    def stop(self) -> None:
        self._stop()


def start_peer(peer: Peer, onnx: Path, work: Path, timeout_s: float) -> Running:
    """Start ``peer`` in its own process group and wait until it answers one request."""
    venv = VENVS / peer.name
    port = _free_port_block()
    launch = peer.launch(venv, onnx, port, work)
    log = open(work / f"{peer.name}.log", "wb")  # noqa: SIM115 (closed in stop)
    proc = subprocess.Popen(
        launch.argv,
        cwd=launch.cwd,
        env={**os.environ, **launch.env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _STARTED.append(proc)

    def stop() -> None:
        _kill_group(proc)
        log.close()

    running = Running(peer.name, peer.name, proc.pid, f"http://127.0.0.1:{port}", stop)
    try:
        _wait_answering(running, peer.formats[0], proc, timeout_s)
    except BaseException:
        stop()
        raise
    return running


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL whatever is left after 10 s."""
    if proc.poll() is None or _group_alive(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.2)
            proc.poll()
        if _group_alive(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_answering(
    running: Running, fmt: str, proc: subprocess.Popen[bytes] | None, timeout_s: float
) -> None:
    import asyncio

    x = np.zeros((1, INPUT_DIM), dtype=np.float32)
    request = loadgen.build_request(running.peer, fmt, MODEL_NAME, x)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before answering")
        try:
            status, _, body = asyncio.run(loadgen.fetch(running.url, request))
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"not answering 200 within {timeout_s:.0f} s ({last})")


def check_answer(running: Running, fmt: str, x: np.ndarray, expected: np.ndarray) -> float:
    """Max absolute difference between the server's probabilities and in-process ORT."""
    import asyncio

    request = loadgen.build_request(running.peer, fmt, MODEL_NAME, x)
    status, headers, body = asyncio.run(loadgen.fetch(running.url, request))
    if status != 200:
        raise RuntimeError(f"{running.name} {fmt}: HTTP {status}: {body[:300]!r}")
    got = loadgen.decode_response(running.peer, fmt, headers, body, CLASSES)
    return float(np.abs(got - expected).max())


def load_run(
    running: Running, fmt: str, rows: int, concurrency: int, args: argparse.Namespace
) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "serving_loadgen.py"),
            "--url",
            running.url,
            "--model",
            MODEL_NAME,
            "--input-dim",
            str(INPUT_DIM),
            "--rows",
            str(rows),
            "--concurrency",
            str(concurrency),
            "--duration",
            str(args.duration),
            "--warmup",
            str(args.warmup),
            "--peer",
            running.peer,
            "--format",
            fmt,
            "--server-pid",
            str(running.pid),
        ],
        capture_output=True,
        text=True,
        timeout=args.duration + args.warmup + 120,
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "loadgen failed"}
    result = json.loads(out.stdout)
    result["server"] = running.name
    return result


# -------------------------------------------------------------------- the model
def build_models(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Train, export to ONNX, publish to a ModelStore; also keep a test batch + answers."""
    import serving_bench as sb
    import torch

    from fedinfer.artifacts import generate_signing_key
    from fedinfer.serving.backends import build_backend, export_onnx
    from fedinfer.serving.model_manager import run_outputs

    torch.set_num_threads(1)
    x, y, x_test, _ = sb.mnist1d(args.samples)
    key = generate_signing_key()
    models = {}
    for name in args.models:
        cfg = sb.MODELS[name]
        module = sb.train(cfg, x, y, args.epochs)
        onnx = work / f"{name}.onnx"
        onnx.write_bytes(export_onnx(module, input_dim=INPUT_DIM))
        store = sb.publish_trained(
            work, name, module, cfg, key, run_id="peers", model_name=MODEL_NAME
        )
        weights, manifest = store.load()
        backend = build_backend("onnx", weights, manifest, threads=1)
        sample = x_test[:3]
        models[name] = {
            "onnx": onnx,
            "store": store,
            "x": sample,
            "expected": run_outputs(backend, sample)["probabilities"],
        }
    return models


# ------------------------------------------------------------------------- runs
def start_all(
    model: dict,
    peers: list[Peer],
    work: Path,
    failures: dict[str, str],
    timeout_s: float,
    workers: tuple[int, ...] = (1,),
) -> list[Running]:
    """Start fedinfer (once per ``workers`` count: ``fedinfer``, ``fedinfer-w2``, ...) and peers."""
    from fedinfer.serving.launch import SiteServer

    servers: list[Running] = []
    for n in workers:
        name = "fedinfer" if n == 1 else f"fedinfer-w{n}"
        ours = SiteServer(  # fedinfer's defaults: max DEFAULT_MAX_BATCH_SIZE rows per pass
            model["store"].root,
            backend="onnx",
            workers=n,
            log_file=work / f"{name}.log",
            audit_dir=work / f"{name}-audit",
        )
        ours.start()
        servers.append(Running(name, "fedinfer", ours.pid or 0, ours.url, ours.stop))
    for peer in peers:
        if peer.name in failures:
            continue
        peer_work = work / peer.name
        peer_work.mkdir(parents=True, exist_ok=True)
        try:
            servers.append(start_peer(peer, model["onnx"], peer_work, timeout_s))
        except Exception as exc:  # record why, keep measuring the others
            failures[peer.name] = f"did not start: {exc} (log: {peer_work / (peer.name + '.log')})"
            print(f"{peer.name}: {failures[peer.name]}", flush=True)
    return servers


def formats_of(name: str) -> tuple[str, ...]:
    return ("json", "binary") if name == "fedinfer" else PEERS[name].formats


def measure_model(
    model_name: str,
    model: dict,
    peers: list[Peer],
    args: argparse.Namespace,
    failures: dict[str, str],
    checks: dict[str, str],
) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix=f"fedinfer-peers-{model_name}-"))
    servers = start_all(model, peers, work, failures, args.startup_timeout)
    results = []
    try:
        for s in list(servers):
            for fmt in formats_of(s.name):
                try:
                    diff = check_answer(s, fmt, model["x"], model["expected"])
                    checks[f"{model_name}/{s.name}/{fmt}"] = f"max |diff| {diff:.1e}"
                except Exception as exc:
                    checks[f"{model_name}/{s.name}/{fmt}"] = f"FAILED: {exc}"
        for rows in args.rows:
            for concurrency in args.concurrency:
                for fmt in args.formats:
                    cell = [s for s in servers if fmt in formats_of(s.name)]
                    samples: dict[str, list[dict]] = {s.name: [] for s in cell}
                    for _ in range(args.reps):  # interleaved: every server once per rep
                        for s in cell:
                            samples[s.name].append(load_run(s, fmt, rows, concurrency, args))
                    for s in cell:
                        r = _median(samples[s.name])
                        r.update(
                            model=model_name,
                            server=s.name,
                            format=fmt,
                            rows=rows,
                            concurrency=concurrency,
                        )
                        results.append(r)
                        print(json.dumps(r), flush=True)
    finally:
        for s in servers:
            try:
                s.stop()
            except Exception as exc:  # keep stopping the rest
                print(f"stopping {s.name}: {exc}", flush=True)
    return results


def _median(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0].get("error", "no run"), "rps": None}
    out: dict = {"runs": len(good), "errors": len(runs) - len(good)}
    for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req"):
        vals = [r[key] for r in good if r.get(key) is not None]
        out[key] = float(np.median(vals)) if vals else None
    out["rps_all"] = [round(r["rps"]) for r in good]
    out["non_200"] = sum(v for r in good for k, v in r["statuses"].items() if str(k) != "200")
    return out


# ----------------------------------------------------------------------- report
def write_report(
    path: Path,
    meta: dict,
    results: list[dict],
    failures: dict[str, str],
    checks: dict[str, str],
    versions: dict[str, dict[str, str]],
) -> None:
    lines = [
        "# fedinfer's site server vs established inference servers",
        "",
        f"Command: `{meta['command']}` (from the repository root; writes this file).",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}, SHARED with other jobs: load average {meta['load_start']} "
        f"at start, {meta['load_end']} at end; {meta['minutes']:.1f} min of runs. Absolute numbers "
        "are noisy: compare servers within one cell (runs interleaved, every server once per "
        "repetition) and the CPU per request, which noise affects less.",
        "",
        f"Model: the SAME ONNX export of each trained model (MNIST-1D, input {INPUT_DIM}, "
        f"{CLASSES} classes) served by every server with ONNX Runtime {ORT.split('==')[1]}, "
        "1 intra-op thread, no spinning; every server returns the softmax probabilities. "
        "Load: bench/serving_loadgen.py in a second process on loopback, closed loop, "
        f"keep-alive, {meta['duration']} s measured after {meta['warmup']} s warm-up, median of "
        f"{meta['reps']} interleaved runs per cell. Server CPU = utime+stime of the server's "
        "whole process tree (frontend, workers, proxies) over the measured window / requests "
        "completed in it. rows/s = req/s x rows per request.",
        "",
        "## Servers",
        "",
        "| server | setup | batching | formats | answer check |",
        "|---|---|---|---|---|",
        "| fedinfer | `fedinfer serve --backend onnx --threads 1` (this repo) | "
        f"dynamic, max {DEFAULT_MAX_BATCH_SIZE} rows (the default; = 64 requests of 64 rows), "
        "no delay | json, binary (OIP) | "
        f"{_checks_for(checks, 'fedinfer')} |",
    ]
    for peer in PEERS.values():
        if peer.name not in meta["peers"]:
            continue
        state = failures.get(peer.name)
        lines.append(
            f"| {peer.name} | {peer.label}; {_versions(versions.get(peer.name, {}))} | "
            f"{peer.batching} | {', '.join(peer.formats)} | "
            f"{'**not measured**: ' + state if state else _checks_for(checks, peer.name)} |"
        )
    lines += [
        "",
        "Request formats: OIP/KServe v2 `POST /v2/models/mnist1d/infer` (fedinfer, triton, "
        "kserve, mlserver) with JSON tensors, or the binary tensor data extension "
        "(`Inference-Header-Content-Length`, raw float32 in and out, as tritonclient sends it); "
        'TorchServe `POST /predictions/mnist1d` with `{"data": rows}` JSON, or raw float32 '
        'bytes in and out ("binary"); LitServe `POST /predict` with `{"input": rows}`. '
        "MLServer's REST API and LitServe have no binary format.",
        "",
        "## Results",
        "",
        "| model | rows/req | format | conc. | server | req/s | rows/s | p50 ms | p99 ms | "
        "CPU ms/req | non-200 | req/s samples |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.get("rps") is None:
            lines.append(
                f"| {r['model']} | {r['rows']} | {r['format']} | {r['concurrency']} | "
                f"{r['server']} | error: {r.get('error')} |||||||"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['rows']} | {r['format']} | {r['concurrency']} | "
            f"{'**fedinfer**' if r['server'] == 'fedinfer' else r['server']} | "
            f"{r['rps']:,.0f} | {r['rps'] * r['rows']:,.0f} | {_f(r['p50_ms'])} | "
            f"{_f(r['p99_ms'])} | {_f(r['cpu_ms_per_req'], 3)} | {r['non_200']} | "
            f"{', '.join(str(v) for v in r['rps_all'])} |"
        )
    lines += ["", "## fedinfer vs the best peer per cell", "", *_verdicts(results)]
    if failures:
        lines += ["", "## Peers not measured", ""]
        lines += [f"- **{name}**: {why}" for name, why in failures.items()]
    path.write_text("\n".join(lines) + "\n")


def _verdicts(results: list[dict]) -> list[str]:
    lines = [
        'Best peer = highest median req/s in the cell. "wins" = fedinfer\'s throughput >= the '
        "best peer's with p99 no worse.",
        "",
        "| model | rows/req | format | conc. | fedinfer req/s | best peer | peer req/s | "
        "fedinfer p99 / peer p99 ms | CPU ms/req fedinfer / lowest peer | verdict |",
        "|---|---:|---|---:|---:|---|---:|---|---|---|",
    ]
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("rps") is not None:
            key = (r["model"], r["rows"], r["format"], r["concurrency"])
            cells.setdefault(key, []).append(r)
    for key, rs in cells.items():
        ours = next((r for r in rs if r["server"] == "fedinfer"), None)
        peers = [r for r in rs if r["server"] != "fedinfer"]
        if ours is None or not peers:
            continue
        best = max(peers, key=lambda r: r["rps"])
        cpu_peers = [r["cpu_ms_per_req"] for r in peers if r.get("cpu_ms_per_req")]
        wins = ours["rps"] >= best["rps"] and ours["p99_ms"] <= best["p99_ms"]
        verdict = (
            "wins" if wins else ("faster, worse p99" if ours["rps"] >= best["rps"] else "**loses**")
        )
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {ours['rps']:,.0f} | "
            f"{best['server']} | {best['rps']:,.0f} | {_f(ours['p99_ms'])} / "
            f"{_f(best['p99_ms'])} | {_f(ours['cpu_ms_per_req'], 3)} / "
            f"{_f(min(cpu_peers) if cpu_peers else None, 3)} | {verdict} |"
        )
    return lines


def _f(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _checks_for(checks: dict[str, str], name: str) -> str:
    mine = {k: v for k, v in checks.items() if k.split("/")[1] == name}
    bad = {k: v for k, v in mine.items() if v.startswith("FAILED")}
    if bad:
        return "; ".join(f"{k}: {v}" for k, v in bad.items())
    diffs = [float(v.split()[-1]) for v in mine.values()]
    return f"probabilities match in-process ORT (max diff {max(diffs):.0e})" if diffs else "–"


def _versions(v: dict[str, str]) -> str:
    return ", ".join(f"{k} {ver}" for k, ver in v.items()) or "versions unknown"


# ------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", choices=("run", "setup"), default="run")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn1d"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--formats", nargs="+", default=["binary", "json"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 32, 64])
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving_peers.md")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    atexit.register(_kill_leftovers)
    peers = [PEERS[p] for p in args.peers]
    failures: dict[str, str] = {}
    for peer in peers:
        why = setup(peer)
        if why:
            failures[peer.name] = why
        print(f"setup {peer.name}: {why or 'ok'}", flush=True)
    if args.action == "setup":
        return
    versions = {p.name: _installed(VENVS / p.name, p.version_of) for p in peers}
    started = time.monotonic()
    meta = {
        "command": " ".join([COMMAND, *sys.argv[1:]]),
        "load_start": round(os.getloadavg()[0], 1),
        "duration": args.duration,
        "warmup": args.warmup,
        "reps": args.reps,
        "peers": args.peers,
    }
    work = Path(tempfile.mkdtemp(prefix="fedinfer-peers-"))
    models = build_models(args, work)
    results: list[dict] = []
    checks: dict[str, str] = {}
    for name, model in models.items():
        results += measure_model(name, model, peers, args, failures, checks)
    meta.update(load_end=round(os.getloadavg()[0], 1), minutes=(time.monotonic() - started) / 60)
    write_report(args.out, meta, results, failures, checks, versions)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
