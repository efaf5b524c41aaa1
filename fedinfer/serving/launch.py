"""Start a site inference server in a subprocess (end of a simulation, tests, benchmarks)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from fedinfer.errors import ServingError
from fedinfer.serving import DEFAULT_MAX_BATCH_SIZE

__all__ = ["SiteServer"]


class SiteServer:
    """``fedinfer serve`` for one model store in a subprocess, on a free loopback port.

    Parameters
    ----------
    model_store : Path
        The site's ModelStore (must hold a current version for readiness).
    host : str
        Bind address (default: ``127.0.0.1``).
    port : int
        0 picks a free port (default).
    backend : str or None
        ``torch``, ``int8`` or ``onnx`` (default: the server's default).
    max_batch_size : int
        Dynamic batching limit (default: 64).
    max_queue_delay_ms : float
        See ``fedinfer serve --help`` (default: 0).
    workers : int
        Server processes on the port (``fedinfer serve --workers``; default: 1). With more
        than one, :attr:`pid` is the supervising parent's and readiness means every
        worker serves.
    auth_tokens, public_key, audit_dir, tls_certfile, tls_keyfile : Path or None
        Passed through as the matching ``fedinfer serve`` options.
    extra_args : list[str]
        More ``fedinfer serve`` arguments.
    log_file : Path or None
        Server stdout/stderr (default: ``<model-store>/../serve.log``).
    startup_timeout_s : float
        How long to wait for ``/v2/health/ready`` (default: 60).

    Examples
    --------
    >>> with SiteServer(Path("site-0/models")) as server:  # doctest: +SKIP
    ...     httpx.get(f"{server.url}/v2/health/ready").status_code
    200
    """

    def __init__(
        self,
        model_store: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: str | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_queue_delay_ms: float = 0.0,
        workers: int = 1,
        auth_tokens: Path | None = None,
        public_key: Path | None = None,
        audit_dir: Path | None = None,
        tls_certfile: Path | None = None,
        tls_keyfile: Path | None = None,
        extra_args: list[str] | None = None,
        log_file: Path | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.model_store = Path(model_store)
        self.host = host
        self.port = port
        self.tls = tls_certfile is not None
        self.startup_timeout_s = startup_timeout_s
        self.log_file = log_file or self.model_store.resolve().parent / "serve.log"
        self._args = [
            "--model-store",
            str(self.model_store),
            "--host",
            host,
            "--max-batch-size",
            str(max_batch_size),
            "--max-queue-delay-ms",
            str(max_queue_delay_ms),
            "--workers",
            str(workers),
        ]
        for flag, value in [
            ("--backend", backend),
            ("--auth-tokens", auth_tokens),
            ("--public-key", public_key),
            ("--audit-dir", audit_dir),
            ("--tls-certfile", tls_certfile),
            ("--tls-keyfile", tls_keyfile),
        ]:
            if value is not None:
                self._args += [flag, str(value)]
        self._args += list(extra_args or [])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123``."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def __enter__(self) -> SiteServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Spawn the server and wait until it reports ready."""
        with tempfile.TemporaryDirectory(prefix="fedinfer-port-") as tmp:
            port_file = Path(tmp) / "port"
            # fedinfer.serving's entry point: the `fedinfer serve` command without importing
            # the simulation side of the CLI (Flower, Ray, Opacus), so it starts faster.
            cmd = [
                sys.executable,
                "-m",
                "fedinfer.serving",
                "serve",
                *self._args,
                "--port",
                str(self.port),
                "--port-file",
                str(port_file),
            ]
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "ab") as log:
                self.process = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            try:
                self.port = self._wait_for_port(port_file)
                self._wait_ready()
            except BaseException:
                self.stop()
                raise

    def _wait_for_port(self, port_file: Path) -> int:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if port_file.exists():
                return int(port_file.read_text())
            time.sleep(0.05)
        raise ServingError(
            f"site server did not bind within {self.startup_timeout_s:.0f}s; see {self.log_file}"
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        # verify=False: a local readiness probe of our own child process; no proxies either
        with httpx.Client(verify=False, timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    if client.get(f"{self.url}/v2/health/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise ServingError(
            f"site server on {self.url} not ready within "
            f"{self.startup_timeout_s:.0f}s; see {self.log_file}"
        )

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ServingError(
                f"site server exited with code {self.process.returncode}; see {self.log_file}"
            )

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate (SIGTERM: graceful drain), then kill if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    @property
    def pid(self) -> int | None:
        """Process id of the server (None before start)."""
        return self.process.pid if self.process else None
