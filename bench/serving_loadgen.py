"""Closed-loop HTTP/1.1 load generator for inference servers (run as its own process).

Each of ``--concurrency`` workers holds one keep-alive connection and sends the
same pre-encoded request back to back. A raw asyncio client, so the generator
spends little CPU of the 2-core box it shares with the server. Prints one JSON
line of results.

The request comes from a per-server *adapter* (``--peer``), so our server and the
peer servers of bench/peers/ are measured by the same client:

=============  ==========================================  =====================================
peer           JSON (``--format json``)                    binary (``--format binary``)
=============  ==========================================  =====================================
fedinfer       OIP ``POST /v2/models/{m}/infer``           OIP binary tensor extension
triton         same (PyTriton's bundled Triton)            same
kserve         same (KServe ModelServer)                   same
mlserver       same (MLServer)                             not supported by MLServer's REST API
torchserve     ``POST /predictions/{m}`` ``{"data": X}``   raw little-endian float32 rows, both ways
litserve       ``POST /predict`` ``{"input": X}``          not supported (JSON API)
=============  ==========================================  =====================================

Every request asks for the ``probabilities`` output only.

With ``--server-pid``, the CPU time of the server's whole process tree (utime + stime
of every process under it, from /proc) is sampled at the start and the end of the
measured window, and ``cpu_ms_per_req`` = that CPU over the requests completed in the
window.

    python bench/serving_loadgen.py --url http://127.0.0.1:8080 --model mnist1d \
        --input-dim 40 --concurrency 16 --duration 5 [--peer triton --format json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

OUTPUT = "probabilities"
OIP_PEERS = ("fedinfer", "triton", "kserve", "mlserver")
PEERS = (*OIP_PEERS, "torchserve", "litserve")
BINARY_PEERS = ("fedinfer", "triton", "kserve", "torchserve")


@dataclass(frozen=True)
class HttpRequest:
    """One request as a peer expects it: path, content type, body, extra headers."""

    path: str
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, host: str, port: int) -> bytes:
        """The raw HTTP/1.1 bytes sent on the wire."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers)
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: {self.content_type}\r\n{extra}"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        )
        return head.encode() + self.body


def _json_rows(x: np.ndarray) -> list[list[float]]:
    """Rows as JSON numbers of float32 precision (the same text for every peer)."""
    return [[float(f"{v:.8g}") for v in row] for row in x.tolist()]


def build_request(peer: str, fmt: str, model: str, x: np.ndarray) -> HttpRequest:
    """Encode the float32 ``(rows, input_dim)`` array ``x`` as ``peer`` expects it.

    Raises
    ------
    ValueError
        ``peer`` has no such format (see the module docstring's table).
    """
    if peer not in PEERS or fmt not in ("json", "binary"):
        raise ValueError(f"unknown peer/format {peer!r}/{fmt!r}")
    if fmt == "binary" and peer not in BINARY_PEERS:
        raise ValueError(f"{peer} has no binary request format; use --format json")
    x = np.ascontiguousarray(x, dtype="<f4")
    if peer == "torchserve":
        if fmt == "binary":
            return HttpRequest(f"/predictions/{model}", "application/octet-stream", x.tobytes())
        body = json.dumps({"data": _json_rows(x)}).encode()
        return HttpRequest(f"/predictions/{model}", "application/json", body)
    if peer == "litserve":
        return HttpRequest(
            "/predict", "application/json", json.dumps({"input": _json_rows(x)}).encode()
        )
    tensor: dict[str, object] = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    path = f"/v2/models/{model}/infer"
    if fmt == "json":
        tensor["data"] = [v for row in _json_rows(x) for v in row]
        doc = {"inputs": [tensor], "outputs": [{"name": OUTPUT}]}
        return HttpRequest(path, "application/json", json.dumps(doc).encode())
    tensor["parameters"] = {"binary_data_size": x.nbytes}
    doc = {"inputs": [tensor], "outputs": [{"name": OUTPUT, "parameters": {"binary_data": True}}]}
    header = json.dumps(doc).encode()
    return HttpRequest(
        path,
        "application/octet-stream",
        header + x.tobytes(),
        (("Inference-Header-Content-Length", str(len(header))),),
    )


def decode_response(
    peer: str, fmt: str, headers: dict[str, str], body: bytes, num_classes: int
) -> np.ndarray:
    """The ``probabilities`` in a 200 response of ``peer``, as float32 ``(rows, num_classes)``."""
    if peer == "torchserve":
        if fmt == "binary":
            return np.frombuffer(body, dtype="<f4").reshape(-1, num_classes)
        return np.asarray(json.loads(body), dtype=np.float32).reshape(-1, num_classes)
    if peer == "litserve":
        return np.asarray(json.loads(body)[OUTPUT], dtype=np.float32).reshape(-1, num_classes)
    split = int(headers.get("inference-header-content-length", len(body)))
    doc = json.loads(body[:split])
    offset = split
    for out in doc["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if out["name"] == OUTPUT:
            if size is None:
                return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
            raw = body[offset : offset + size]
            return np.frombuffer(raw, dtype="<f4").reshape(out["shape"])
        offset += size or 0
    raise ValueError(f"no {OUTPUT!r} output in the response")


# ----------------------------------------------------------------- HTTP client
async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name:
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            chunks.append(chunk[:-2])
        return status, headers, b"".join(chunks)
    return status, headers, await reader.readexactly(int(headers.get("content-length", 0)))


async def _read_status_and_skip(reader: asyncio.StreamReader) -> int:
    """The hot-loop variant: only the status, the body is skipped (Content-Length fast path)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = -1
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length < 0:  # chunked: take the slow path's parser
        if b"chunked" in head.lower():
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        return int(head[9:12])
    await reader.readexactly(length)
    return int(head[9:12])


async def fetch(url: str, request: HttpRequest) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a fresh connection and return (status, headers, body)."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request.encode(host, port))
        return await read_response(reader)
    finally:
        writer.close()


# ---------------------------------------------------------- server CPU (/proc)
def tree_cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and every live descendant (children of children ...)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(cpu.get(pid, 0.0) for pid in tree)


# ------------------------------------------------------------------- the load
async def worker(
    host: str,
    port: int,
    request: bytes,
    window: tuple[float, float],
    latencies: list[float],
    statuses: dict[int, int],
    completed: list[int],
) -> None:
    record_from, stop_at = window
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                return
            writer.write(request)
            status = await _read_status_and_skip(reader)
            done = time.perf_counter()
            if record_from <= done < stop_at:
                completed[0] += 1
            if started >= record_from:
                latencies.append(done - started)
                statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def _cpu_window(pid: int | None, window: tuple[float, float], out: list[float]) -> None:
    if pid is None:
        return
    for at in window:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        out.append(tree_cpu_seconds(pid))


async def run(args: argparse.Namespace) -> dict[str, object]:
    url = urlparse(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    x = np.random.default_rng(0).normal(size=(args.rows, args.input_dim)).astype(np.float32)
    request = build_request(args.peer, args.format, args.model, x).encode(host, port)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    completed = [0]
    cpu: list[float] = []
    start = time.perf_counter()
    window = (start + args.warmup, start + args.warmup + args.duration)
    await asyncio.gather(
        _cpu_window(args.server_pid, window, cpu),
        *[
            worker(host, port, request, window, latencies, statuses, completed)
            for _ in range(args.concurrency)
        ],
    )
    lat = np.array(latencies) * 1000
    result: dict[str, object] = {
        "peer": args.peer,
        "format": args.format,
        "concurrency": args.concurrency,
        "rows": args.rows,
        "duration_s": args.duration,
        "requests": len(latencies),
        "ok": statuses.get(200, 0),
        "statuses": statuses,
        "rps": completed[0] / args.duration,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }
    if len(cpu) == 2:
        result["cpu_ms_per_req"] = 1e3 * (cpu[1] - cpu[0]) / max(completed[0], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-dim", type=int, required=True)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--peer", choices=PEERS, default="fedinfer")
    parser.add_argument("--format", choices=("binary", "json"), default="binary")
    parser.add_argument("--server-pid", type=int, help="measure this process tree's CPU")
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
