"""``fedinfer serve --workers N``: N server processes on one port, supervised by a parent.

One server process runs one event loop on one thread; on a busy 2-core site box
that thread waits for a CPU most of the time (bench/results/serving_cpu_share.md).
N worker processes, each the single-process server of ``fedinfer serve``, give
the scheduler N loops to run.

How the port is shared: ``SO_REUSEPORT``. The parent binds one socket per worker
to the same port, and the kernel spreads new connections evenly over the sockets
that listen (by a hash of the client's address and port). The alternative, one
listening socket inherited by all workers, leaves the choice to whichever worker
wakes first: with keep-alive clients that open their connections at once (every
load generator, most client pools) one worker can end up holding most of them.
A worker's socket starts listening only once its model is loaded (uvicorn's
lifespan runs first), so no connection ever waits on a worker that cannot answer;
when a worker dies, its socket closes with it, connections it had not accepted
yet are reset, and new ones go to the others until its replacement listens.
The parent keeps one more socket bound (never listening) so the port stays this
server's while workers come and go; only processes of the same user can join a
``SO_REUSEPORT`` group (Linux), and they can read the site's state anyway.

Parent (this module's :func:`serve_workers`):

- validates the options, opens the site's audit log (the only writer, holding its
  lock), reserves the port and writes ``--port-file`` once every worker serves;
- spawns ``python -m fedinfer.serving.workers`` per worker with its socket, a pipe
  for its audit lines and a pipe it writes one byte to once it serves;
- appends each worker's audit lines (whole lines only) to the audit log;
- restarts a worker that dies after it served (more than 5 deaths of one worker in
  a minute stop the server); a worker that dies before it served stops the server
  with an error (a bad store or key fails in every worker alike);
- on SIGTERM/SIGINT sends SIGTERM to every worker (graceful drain), kills what is
  left after 30 s, and removes the shared metrics directory.

Each worker has its own ModelManager (its own store watcher: a new version reaches
every worker within ``--poll-interval``), batcher, rate and login limiters (per
worker: N workers allow up to N times ``--rate-limit`` and
``--login-failures-per-min``), and answers with a ``x-fedinfer-worker: K`` header.
Metrics: see :mod:`fedinfer.serving.metrics`. Linux only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import Any

from fedinfer.crypto.at_rest import resolve_state_key
from fedinfer.errors import FedInferError, ServingError
from fedinfer.serving.audit import AuditLog, AuditPipe
from fedinfer.serving.metrics import MULTIPROC_ENV
from fedinfer.serving.server import (
    ServeOptions,
    announce,
    bind,
    build_app,
    run_app,
    server_url,
    write_port_file,
)

__all__ = ["WORKER_HEADER", "serve_workers"]

WORKER_HEADER = "x-fedinfer-worker"
"""Response header naming the worker (0 .. N-1) that answered, under ``--workers N``."""
_WORKER_ENV = "FEDINFER_SERVE_WORKER"
_DEATHS_PER_MINUTE = 5
_STOP_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1
_F_SETPIPE_SZ = 1031
_AUDIT_PIPE_BYTES = 1 << 20
_COALESCE_S = 0.005
_METRICS_PREFIX = "fedinfer-metrics-"
"""After reading audit lines, wait this long so the next read takes many batches at once."""

logger = logging.getLogger("fedinfer.serving.workers")


@dataclass(eq=False)
class _Worker:
    """One worker process as the parent sees it."""

    index: int
    process: subprocess.Popen[bytes]
    audit_fd: int | None
    ready_fd: int | None
    started: bool = False
    partial: bytes = b""
    """Audit bytes after the last newline (the rest of that line is still on its way)."""
    deaths: list[float] = field(default_factory=list)


def serve_workers(options: ServeOptions) -> None:
    """Serve ``options`` with ``options.workers`` processes until SIGTERM/SIGINT (blocking).

    Raises
    ------
    ServingError
        A worker exited before it served, or kept dying.
    """
    options.validate()
    supervisor = _Supervisor(options)  # binds and opens the log: a user error raises here
    logging.basicConfig(
        level=options.log_level.upper(),
        force=True,
        format="%(asctime)s %(levelname)s parent %(name)s: %(message)s",
    )
    previous = {
        signum: signal.signal(signum, supervisor.request_stop)
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        supervisor.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Supervisor:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        audit_dir = options.resolved_audit_dir()
        key = resolve_state_key(options.state_key, protects=[options.model_store, audit_dir])
        self.reserved = _reserve_port(options.host, options.port)
        try:
            self.audit = AuditLog(audit_dir, key=key)  # the only writer: it holds the lock
        except BaseException:
            self.reserved.close()
            raise
        self.port: int = self.reserved.getsockname()[1]
        self.url = server_url(options, self.port)
        _remove_stale_metrics_dirs()
        self.metrics_dir = Path(tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-"))
        self.selector = selectors.DefaultSelector()
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.announced = False

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: stop at the next turn of the loop."""
        self.stopping = True

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        try:
            for index in range(self.options.workers):
                self._spawn(index)
            while not self.stopping:
                self._pump(0.2)
                self._reap()
        finally:
            self._stop_all()

    def _spawn(self, index: int, deaths: list[float] | None = None) -> None:
        sock = bind(self.options.host, self.port, reuse_port=True)
        audit_r, audit_w = os.pipe()
        with contextlib.suppress(OSError):  # room for bursts (Linux; the default is 64 KiB)
            fcntl.fcntl(audit_w, _F_SETPIPE_SZ, _AUDIT_PIPE_BYTES)
        ready_r, ready_w = os.pipe()
        spec = {
            "index": index,
            "parent": os.getpid(),
            "listen_fd": sock.fileno(),
            "audit_fd": audit_w,
            "ready_fd": ready_w,
            "options": _options_to_json(self.options),
        }
        env = dict(os.environ)
        env.update({MULTIPROC_ENV: str(self.metrics_dir), _WORKER_ENV: json.dumps(spec)})
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedinfer.serving.workers"],
                pass_fds=(sock.fileno(), audit_w, ready_w),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:  # the worker holds them now
            sock.close()
            os.close(audit_w)
            os.close(ready_w)
        worker = _Worker(index, process, audit_r, ready_r, deaths=deaths or [])
        self.workers[index] = worker
        self.selector.register(audit_r, selectors.EVENT_READ, ("audit", worker))
        self.selector.register(ready_r, selectors.EVENT_READ, ("ready", worker))

    def _pump(self, timeout_s: float) -> None:
        """Move workers' audit lines to the log and note readiness, for up to ``timeout_s``."""
        events = self.selector.select(timeout_s)
        if events and not self.stopping:
            time.sleep(_COALESCE_S)  # under load: one read per worker per few ms, not per batch
        for key, _ in events:
            kind, worker = key.data
            try:
                data = os.read(key.fd, _AUDIT_PIPE_BYTES)
            except OSError:
                data = b""
            if kind == "audit":
                self._audit_bytes(worker, data)
            elif data:
                worker.started = True
                self._announce_once()
            else:
                self._close_pipe(worker, "ready")

    def _audit_bytes(self, worker: _Worker, data: bytes) -> None:
        if not data:  # the worker closed its end: it exited
            if worker.partial:
                logger.warning(
                    "worker %d died mid-way through an audit line; %d bytes dropped",
                    worker.index,
                    len(worker.partial),
                )
            worker.partial = b""
            self._close_pipe(worker, "audit")
            return
        buffer = worker.partial + data
        cut = buffer.rfind(b"\n") + 1
        worker.partial = buffer[cut:]
        if cut:
            self.audit.append_lines([line + b"\n" for line in buffer[: cut - 1].split(b"\n")])

    def _close_pipe(self, worker: _Worker, kind: str) -> None:
        """Stop reading the worker's ``audit`` or ``ready`` pipe."""
        fd = worker.audit_fd if kind == "audit" else worker.ready_fd
        if fd is not None:
            self.selector.unregister(fd)
            os.close(fd)
        if kind == "audit":
            worker.audit_fd = None
        else:
            worker.ready_fd = None

    def _announce_once(self) -> None:
        if self.announced or not all(w.started for w in self.workers.values()):
            return
        self.announced = True
        if self.options.port_file is not None:
            write_port_file(self.options.port_file, self.port)
        pids = ", ".join(str(w.process.pid) for w in self.workers.values())
        print(
            f"fedinfer serve: listening on {self.url} (model store {self.options.model_store}; "
            f"{len(self.workers)} workers, pids {pids})",
            flush=True,
        )

    # ------------------------------------------------------------------ restarts
    def _reap(self) -> None:
        for index, worker in list(self.workers.items()):
            code = worker.process.poll()
            if code is None:
                continue
            self._finish(worker)
            if self.stopping:
                continue
            if not worker.started:
                raise ServingError(
                    f"server worker {index} exited with code {code} before it served; "
                    "see the log above"
                )
            now = time.monotonic()
            deaths = [t for t in worker.deaths if now - t < 60.0] + [now]
            if len(deaths) > _DEATHS_PER_MINUTE:
                raise ServingError(
                    f"server worker {index} died {len(deaths)} times within a minute "
                    f"(last exit code {code}); stopping. See the log above"
                )
            logger.warning(
                "server worker %d (pid %d) exited with code %s; starting a new one",
                index,
                worker.process.pid,
                code,
            )
            self._spawn(index, deaths)

    def _finish(self, worker: _Worker) -> None:
        """Collect a dead worker's last audit lines; drop its live gauges."""
        from prometheus_client.multiprocess import mark_process_dead

        while worker.audit_fd is not None:  # its write end is closed: reads end at EOF
            self._audit_bytes(worker, os.read(worker.audit_fd, _AUDIT_PIPE_BYTES))
        if worker.ready_fd is not None and os.read(worker.ready_fd, 1):  # dead: never blocks
            worker.started = True
        self._close_pipe(worker, "ready")
        mark_process_dead(worker.process.pid, str(self.metrics_dir))
        del self.workers[worker.index]

    # ------------------------------------------------------------------ shutdown
    def _stop_all(self) -> None:
        self.stopping = True
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while any(w.process.poll() is None for w in self.workers.values()):
            if time.monotonic() > deadline:
                for worker in self.workers.values():
                    worker.process.kill()
                break
            self._pump(0.05)  # keep reading: a worker draining requests still logs them
        for worker in list(self.workers.values()):
            worker.process.wait()
            self._finish(worker)
        self.selector.close()
        self.audit.close()
        self.reserved.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def _remove_stale_metrics_dirs() -> None:
    """Remove this user's metrics directories whose server was killed (SIGKILL skips cleanup)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_METRICS_PREFIX}*-*"):
        pid = path.name.removeprefix(_METRICS_PREFIX).partition("-")[0]
        try:
            if not pid.isdigit() or path.lstat().st_uid != os.getuid() or path.is_symlink():
                continue
            os.kill(int(pid), 0)  # still running: not stale
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # gone meanwhile, or another user's process of that pid: leave it
            continue


def _reserve_port(host: str, port: int) -> socket.socket:
    """A SO_REUSEPORT socket bound to ``port`` (0: a free one) that no one else listens on.

    Sockets of the same user that set SO_REUSEPORT may share a port, so a second server
    (or any program of this user) already listening there would silently get a share of
    the connections. A plain bind first fails if anything listens on the port.
    """
    probe = bind(host, port)  # ConfigError naming --port if the port is taken
    port = probe.getsockname()[1]
    probe.close()
    return bind(host, port, reuse_port=True)


# ------------------------------------------------------------------ options on the wire
def _options_to_json(options: ServeOptions) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(options):
        value = getattr(options, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def _options_from_json(doc: dict[str, Any]) -> ServeOptions:
    kwargs: dict[str, Any] = {}
    for f in fields(ServeOptions):
        value = doc[f.name]
        if value is not None and "Path" in str(f.type):
            value = Path(value)
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return ServeOptions(**kwargs)


# ------------------------------------------------------------------ worker process
def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the parent dies, even by SIGKILL (Linux)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        raise SystemExit(1)


def _worker_main() -> int:
    spec = json.loads(os.environ.pop(_WORKER_ENV))
    _die_with_parent(int(spec["parent"]))
    index, ready_fd = int(spec["index"]), int(spec["ready_fd"])
    for fd in (spec["listen_fd"], spec["audit_fd"], ready_fd):
        os.set_inheritable(fd, False)  # a subprocess of the worker must not keep them open
    options = _options_from_json(spec["options"])
    sock = socket.socket(fileno=int(spec["listen_fd"]))
    app = build_app(options, audit=AuditPipe(int(spec["audit_fd"])))
    app.response_headers = [(WORKER_HEADER.encode(), str(index).encode())]
    url = server_url(options, sock.getsockname()[1])

    def started() -> None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
        announce(app, url, options, who=f"fedinfer serve worker {index} (pid {os.getpid()})")

    app.on_started = started
    try:
        run_app(app, options, sock, log_name=f"worker-{index} %(name)s")
    except FedInferError as exc:
        print(f"fedinfer serve worker {index}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
