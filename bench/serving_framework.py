"""Raw ASGI vs FastAPI for the same inference endpoint -> appended to bench/results/serving.md.

Both servers run the SAME InferenceApp internals (auth, parsing, batching, model, audit,
metrics) under the same uvicorn; the FastAPI variant routes ``POST /v2/models/{name}/infer``
through a FastAPI route with a ``Request`` and a ``Response`` object, the way a FastAPI
implementation would. The load generator is a second process (bench/serving_loadgen.py).

    pip install -e ".[bench]"   # FastAPI: a benchmark dependency, not a runtime one
    python bench/serving_framework.py
"""

# No `from __future__ import annotations` here: FastAPI resolves the route's parameter
# annotations (Request) at runtime from module globals.
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def serve(mode: str, store_root: str, port_file: str) -> None:
    """Server process: build the app, optionally wrapped by FastAPI, run uvicorn."""
    import socket

    import uvicorn

    from fedinfer.serving.app import _Exchange, _request_id
    from fedinfer.serving.server import ServeOptions, build_app

    inner = build_app(ServeOptions(model_store=Path(store_root), backend="onnx", port=0))
    app = inner
    if mode == "fastapi":
        from contextlib import asynccontextmanager

        from fastapi import FastAPI, Request, Response

        @asynccontextmanager
        async def lifespan(_: FastAPI):
            await inner.manager.start()
            yield
            await inner.manager.stop()

        app = FastAPI(lifespan=lifespan)

        @app.post("/v2/models/{name}/infer")
        async def infer(name: str, request: Request) -> Response:
            headers = {k.lower().encode(): v.encode() for k, v in request.headers.items()}
            ex = _Exchange("POST", request.url.path, headers, _request_id(headers))
            ex.endpoint, ex.model = "infer", name
            inner._authorize(ex, "infer")
            inner._check_name(name)
            status, extra, body = await inner._infer(ex, await request.body(), None)
            inner._record(ex, status, 0.0)
            return Response(
                body, status_code=status, headers={k.decode(): v.decode() for k, v in extra}
            )

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    Path(port_file).write_text(str(sock.getsockname()[1]))
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, ws="none")).run(
        sockets=[sock]
    )


def measure(mode: str, store_root: Path, concurrency: int, duration: float) -> dict:
    from serving_bench import cpu_seconds

    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", mode, str(store_root), str(port_file)]
        )
        try:
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.1)
            url = f"http://127.0.0.1:{port_file.read_text()}"
            import httpx

            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if (
                        httpx.post(
                            f"{url}/v2/models/mnist1d/infer",
                            json={
                                "inputs": [
                                    {
                                        "name": "input",
                                        "shape": [1, 40],
                                        "datatype": "FP32",
                                        "data": [0.0] * 40,
                                    }
                                ]
                            },
                            trust_env=False,
                        ).status_code
                        == 200
                    ):
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            else:
                raise RuntimeError(f"{mode} server never answered 200")
            cpu0 = cpu_seconds(proc.pid)
            out = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "bench" / "serving_loadgen.py"),
                    "--url",
                    url,
                    "--model",
                    "mnist1d",
                    "--input-dim",
                    "40",
                    "--concurrency",
                    str(concurrency),
                    "--duration",
                    str(duration),
                    "--warmup",
                    "0",
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            result = json.loads(out.stdout)
            result["cpu_ms_per_req"] = (
                1e3 * (cpu_seconds(proc.pid) - cpu0) / max(result["requests"], 1)
            )
            result["mode"] = mode
            return result
        finally:
            proc.terminate()
            proc.wait()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(*sys.argv[2:5])
        return
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from serving_bench import MODELS, publish_trained

    from fedinfer.artifacts import generate_signing_key
    from fedinfer.models import build_model

    tmp = Path(tempfile.mkdtemp(prefix="fedinfer-fw-"))
    key, cfg = generate_signing_key(), MODELS["mlp"]
    module = build_model(cfg, input_dim=40, num_classes=10)
    store = publish_trained(tmp, "mlp", module, cfg, key, run_id="fw")
    rows = []
    for _ in range(2):  # interleaved A/B/A/B: the shared box's load drifts
        for mode in ("raw", "fastapi"):
            rows.append(measure(mode, store.root, 16, 4.0))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "",
        "## Raw ASGI vs FastAPI (same internals, mlp, onnx, c=16, batching on)",
        "",
        "Command: `python bench/serving_framework.py` (interleaved A/B runs, 4 s each).",
        "",
        "| app | req/s | p50 ms | p99 ms | server CPU ms/req |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['cpu_ms_per_req']:.3f} |"
        )
    for mode in ("raw", "fastapi"):
        mine = [r for r in rows if r["mode"] == mode]
        lines.append(
            f"\nMean {mode}: {np.mean([r['rps'] for r in mine]):,.0f} req/s, "
            f"{np.mean([r['cpu_ms_per_req'] for r in mine]):.3f} CPU ms/req."
        )
    out = ROOT / "bench" / "results" / "serving.md"
    with open(out, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
