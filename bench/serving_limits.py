"""What the abuse limits of issue 12 cost -> bench/results/serving_limits.md.

Three servers run the same app, model and settings side by side, differing only
in the HTTP connection protocol:

* ``hardened``: ``fedinfer serve`` as shipped: uvicorn's httptools parser with the
  pipeline bound and header timeout of fedinfer.serving.protocol, limit_concurrency,
  the body timeout (in the app, so in all three);
* ``stock``: uvicorn's plain httptools protocol, no connection limit (the old server);
* ``h11``: uvicorn's pure-Python h11 protocol with limit_concurrency (the alternative
  the issue suggested; it does not grow on pipelining either).

Each gets closed-loop 1-row binary load from a second process (bench/serving_loadgen.py)
at 1, 16 and 64 connections, runs interleaved, median of ``--reps``; then a pipelining
flood (one connection sending requests and never reading) for ``--flood`` seconds, with
the server's RSS before and after (the flood stops early past +400 MB).

    python bench/serving_limits.py            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = ("hardened", "stock", "h11")
COMMAND = "python bench/serving_limits.py"


# ------------------------------------------------------------------ server side
def serve_variant(variant: str, store: Path, port_file: Path) -> None:
    """Run one server variant in this process until SIGTERM."""
    import uvicorn

    from fedinfer.serving.server import ServeOptions, bind, build_app, uvicorn_config

    options = ServeOptions(model_store=store, port=0, log_level="warning")
    app = build_app(options)
    sock = bind("127.0.0.1", 0)
    config = uvicorn_config(app, options)
    if variant == "stock":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        config.http_protocol_class = HttpToolsProtocol
        config.limit_concurrency = None
    elif variant == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol

        config.http_protocol_class = H11Protocol
    port_file.write_text(str(sock.getsockname()[1]))
    uvicorn.Server(config).run(sockets=[sock])


# ------------------------------------------------------------------ client side
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start(variant: str, store: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = work / f"{variant}.port"
    port_file.unlink(missing_ok=True)
    log = open(work / f"{variant}.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", variant, "--store", str(store), "--port-file",
         str(port_file)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{variant} server exited; see {work / f'{variant}.log'}")
        if port_file.exists() and port_file.read_text():
            url = f"http://127.0.0.1:{port_file.read_text()}"
            try:
                if httpx.get(f"{url}/v2/health/ready", trust_env=False).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise TimeoutError(f"{variant} server not ready")


def load(url: str, pid: int, concurrency: int, duration: float) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serving_loadgen.py"), "--url", url, "--model",
         "mnist1d", "--input-dim", "40", "--concurrency", str(concurrency), "--duration",
         str(duration), "--warmup", "1", "--server-pid", str(pid)],
        check=True,
        capture_output=True,
        text=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def flood(url: str, pid: int, seconds: float) -> dict:
    """One connection pipelining 1-row health requests and never reading a reply."""
    host, port = url.removeprefix("http://").split(":")
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    before = rss_mb(pid)
    sent = 0
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(0.5)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and rss_mb(pid) - before < 400:
            try:
                sent += sock.send(request * 1000)
            except TimeoutError:
                pass  # the server stopped reading
        grown = rss_mb(pid) - before
    return {"rss_before_mb": before, "rss_growth_mb": grown, "requests_sent": sent // len(request)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--flood", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/serving_limits.md")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_variant(args.serve, args.store, args.port_file)
        return

    import torch
    from serving_bench import MODELS, publish_trained

    from fedinfer.artifacts import generate_signing_key
    from fedinfer.models import build_model

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="fedinfer-limits-"))
    torch.manual_seed(0)
    module = build_model(MODELS["mlp"], input_dim=40, num_classes=10)
    store = publish_trained(work, "mlp", module, MODELS["mlp"], generate_signing_key(),
                            run_id="bench-limits")  # fmt: skip
    servers = {v: start(v, store.root, work) for v in VARIANTS}
    rows = []
    try:
        for c in (1, 16, 64):
            samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for _ in range(args.reps):
                for v, (proc, url) in servers.items():
                    samples[v].append(load(url, proc.pid, c, args.duration))
            for v in VARIANTS:
                runs = samples[v]
                row = {"variant": v, "concurrency": c}
                for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req"):
                    row[key] = float(np.median([r[key] for r in runs]))
                row["non_200"] = sum(
                    n for r in runs for s, n in r["statuses"].items() if s != "200"
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
        floods = {}
        for v, (proc, url) in servers.items():
            floods[v] = flood(url, proc.pid, args.flood)
            print(v, json.dumps(floods[v]), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    write_report(args.out, rows, floods, args, time.time() - started)


def write_report(path: Path, rows: list[dict], floods: dict, args, seconds: float) -> None:
    by = {(r["variant"], r["concurrency"]): r for r in rows}
    lines = [
        "# Serving: the cost of the abuse limits (issue 12)",
        "",
        f"`{COMMAND}` (mlp, 1-row binary requests, load from a second process on loopback, "
        f"{args.reps} interleaved runs of {args.duration:g} s, median). "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared, "
        f"load average {os.getloadavg()[0]:.1f} at the end; {seconds:.0f} s in all.",
        "",
        "| connections | variant | req/s | p50 ms | p99 ms | server CPU ms/req | non-200 |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in (1, 16, 64):
        for v in VARIANTS:
            r = by[(v, c)]
            lines.append(
                f"| {c} | {v} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.1f} | "
                f"{r['cpu_ms_per_req']:.3f} | {r['non_200']} |"
            )

    def cpu_ratio(variant: str) -> str:
        return ", ".join(
            f"c={c} {by[(variant, c)]['cpu_ms_per_req'] / by[('stock', c)]['cpu_ms_per_req']:.2f}x"
            for c in (1, 16, 64)
        )

    lines += [
        "",
        f"CPU per request, hardened / stock: {cpu_ratio('hardened')}; "
        f"h11 / stock: {cpu_ratio('h11')}.",
        "",
        f"## Pipelining flood ({args.flood:g} s, one connection, never reads; stops at +400 MB)",
        "",
        "| variant | RSS before MB | RSS growth MB | requests sent |",
        "|---|---|---|---|",
    ]
    for v in VARIANTS:
        f = floods[v]
        lines.append(
            f"| {v} | {f['rss_before_mb']:.0f} | {f['rss_growth_mb']:+.0f} | "
            f"{f['requests_sent']:,} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
