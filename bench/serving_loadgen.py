"""Closed-loop HTTP/1.1 load generator for the site inference server (run as its own process).

Each of ``--concurrency`` workers holds one keep-alive connection and sends the
same pre-encoded OIP request (binary tensor extension, as tritonclient sends it)
back to back. A raw asyncio client, so the generator spends little CPU of the
2-core box it shares with the server. Prints one JSON line of results.

    python bench/serving_loadgen.py --url http://127.0.0.1:8080 --model mnist1d \
        --input-dim 40 --concurrency 16 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlparse

import numpy as np


def build_request(host: str, port: int, model: str, input_dim: int, rows: int) -> bytes:
    x = np.random.default_rng(0).normal(size=(rows, input_dim)).astype(np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [rows, input_dim],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    body = header + x.tobytes()
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def worker(
    host: str,
    port: int,
    request: bytes,
    stop_at: float,
    record_from: float,
    latencies: list[float],
    statuses: dict[int, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.perf_counter()
            if started >= record_from:
                latencies.append(done - started)
                statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    url = urlparse(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    request = build_request(host, port, args.model, args.input_dim, args.rows)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    record_from = start + args.warmup
    stop_at = record_from + args.duration
    await asyncio.gather(
        *[
            worker(host, port, request, stop_at, record_from, latencies, statuses)
            for _ in range(args.concurrency)
        ]
    )
    lat = np.array(latencies) * 1000
    ok = statuses.get(200, 0)
    return {
        "concurrency": args.concurrency,
        "rows": args.rows,
        "duration_s": args.duration,
        "requests": len(latencies),
        "ok": ok,
        "statuses": statuses,
        "rps": ok / args.duration,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-dim", type=int, required=True)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        print(json.dumps(runner.run(run(args))))


if __name__ == "__main__":
    main()
