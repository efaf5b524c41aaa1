"""Build and run the inference server from :class:`ServeOptions` (``fedinfer serve``)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedinfer.artifacts import ModelStore, load_public_key
from fedinfer.crypto.at_rest import resolve_state_key
from fedinfer.errors import ConfigError, DataError
from fedinfer.serving import DEFAULT_BACKEND, DEFAULT_MAX_BATCH_SIZE, MAX_WORKERS
from fedinfer.serving.app import AppLimits, InferenceApp
from fedinfer.serving.audit import AuditLog, AuditPipe
from fedinfer.serving.auth import LoginLimiter, RateLimiter, TokenFile
from fedinfer.serving.backends import BACKEND_NAMES
from fedinfer.serving.metrics import ServingMetrics
from fedinfer.serving.model_manager import BatchingOptions, ModelManager
from fedinfer.serving.protocol import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_PIPELINE,
    limited_protocol,
)

if TYPE_CHECKING:
    import uvicorn

__all__ = [
    "DEFAULT_BACKEND",
    "MAX_WORKERS",
    "TLS_CIPHERS",
    "ServeOptions",
    "announce",
    "bind",
    "build_app",
    "run_app",
    "serve",
    "server_url",
    "tls_context",
    "uvicorn_config",
    "write_port_file",
]

# TLS 1.2 with forward-secret AEAD suites only (TLS 1.3 suites are fixed by OpenSSL).
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``fedinfer serve`` accepts (see ``fedinfer serve --help`` for each)."""

    model_store: Path
    host: str = "127.0.0.1"
    port: int = 8080
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    auth_tokens: Path | None = None
    public_key: Path | None = None
    backend: str = DEFAULT_BACKEND
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 1024
    inline_below_ms: float = 0.2
    rate_limit: float = 0.0
    rate_burst: float | None = None
    max_body_bytes: int = 8 << 20
    nonfinite: str = "reject"
    audit_dir: Path | None = None
    poll_interval_s: float = 0.5
    threads: int | None = 1
    validation_data: Path | None = None
    label_column: str = "label"
    max_accuracy_drop: float = 0.01
    prune_amount: float = 0.0
    port_file: Path | None = None
    log_level: str = "info"
    state_key: Path | None = None
    insecure: bool = False
    """Allow a non-loopback bind without TLS and tokens (anonymous callers may infer)."""
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = 30.0
    limit_concurrency: int = 512
    max_pipeline: int = DEFAULT_MAX_PIPELINE
    keep_versions: int = 2
    pin_versions: tuple[int, ...] = ()
    login_failures_per_min: float = 10.0
    workers: int = 1
    """Server processes on the port (1: this process serves; N > 1: a parent supervises N)."""

    def resolved_audit_dir(self) -> Path:
        """``--audit-dir``, or ``<model-store>/../audit`` (the site state directory's)."""
        return self.audit_dir or Path(self.model_store).resolve().parent / "audit"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option."""
        if self.backend not in BACKEND_NAMES:
            raise ConfigError(
                f"`--backend` is {self.backend!r}; choose one of {', '.join(BACKEND_NAMES)}"
            )
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ConfigError("`--tls-certfile` and `--tls-keyfile` go together; pass both")
        if self.max_batch_size < 1 or self.max_queue_size < 1:
            raise ConfigError("`--max-batch-size` and `--max-queue-size` must be >= 1")
        if self.max_queue_delay_ms < 0:
            raise ConfigError("`--max-queue-delay-ms` must be >= 0")
        if self.inline_below_ms < 0:
            raise ConfigError("`--inline-below-ms` must be >= 0 (0: always a worker thread)")
        if not 0 <= self.prune_amount < 1:
            raise ConfigError(f"`--prune-amount` must be in [0, 1) (got {self.prune_amount})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"`--port` must be in 0..65535 (got {self.port})")
        AppLimits(max_body_bytes=self.max_body_bytes, nonfinite=self.nonfinite)  # its checks
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ConfigError("`--header-timeout` and `--body-timeout` must be > 0 seconds")
        if self.limit_concurrency < 1 or self.max_pipeline < 1:
            raise ConfigError("`--limit-concurrency` and `--max-pipeline` must be >= 1")
        if self.keep_versions < 1:
            raise ConfigError(f"`--keep-versions` must be >= 1 (got {self.keep_versions})")
        if self.login_failures_per_min <= 0:
            raise ConfigError("`--login-failures-per-min` must be > 0")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(
                f"`--workers` must be in 1..{MAX_WORKERS} (got {self.workers}); "
                "about one per CPU core is the most that helps"
            )
        if self.workers > 1 and not sys.platform.startswith("linux"):
            raise ConfigError("`--workers` above 1 needs Linux (SO_REUSEPORT); use --workers 1")
        self._check_exposure()

    def _check_exposure(self) -> None:
        if _is_loopback(self.host) or self.insecure:
            return
        missing = [
            what
            for what, absent in (
                ("TLS (--tls-certfile/--tls-keyfile)", self.tls_certfile is None),
                ("authentication (--auth-tokens)", self.auth_tokens is None),
            )
            if absent
        ]
        if missing:
            raise ConfigError(
                f"`--host {self.host}` is reachable from the network but the server has no "
                f"{' and no '.join(missing)}; add them, bind 127.0.0.1, or pass --insecure "
                "to serve anyway"
            )


def build_app(options: ServeOptions, *, audit: AuditPipe | None = None) -> InferenceApp:
    """Assemble the ASGI app (nothing is loaded until its lifespan starts).

    ``audit``: a ``--workers`` process's pipe to its parent instead of the audit directory.
    """
    options.validate()
    metrics = ServingMetrics()
    public_key = load_public_key(options.public_key) if options.public_key else None
    audit_dir = options.resolved_audit_dir()
    state_key = resolve_state_key(options.state_key, protects=[options.model_store, audit_dir])
    manager = ModelManager(
        ModelStore(options.model_store, key=state_key),
        backend=options.backend,
        public_key=public_key,
        batching=BatchingOptions(
            options.max_batch_size,
            options.max_queue_delay_ms,
            options.max_queue_size,
            options.inline_below_ms,
        ),
        metrics=metrics,
        poll_interval_s=options.poll_interval_s,
        keep_versions=options.keep_versions,
        pinned=options.pin_versions,
        threads=options.threads,
        validation=_validation_split(options),
        max_accuracy_drop=options.max_accuracy_drop,
        prune_amount=options.prune_amount,
    )
    rate = options.rate_limit
    return InferenceApp(
        manager,
        metrics=metrics,
        tokens=TokenFile(options.auth_tokens) if options.auth_tokens else None,
        rate_limiter=RateLimiter(rate, options.rate_burst) if options.auth_tokens or rate else None,
        audit=audit if audit is not None else AuditLog(audit_dir, key=state_key),
        limits=AppLimits(
            max_body_bytes=options.max_body_bytes,
            nonfinite=options.nonfinite,
            body_timeout_s=options.body_timeout_s,
            # --no-batching (1) turns off batching across requests, not whole requests
            max_batch_size=options.max_batch_size
            if options.max_batch_size > 1
            else DEFAULT_MAX_BATCH_SIZE,
        ),
        login_limiter=LoginLimiter(options.login_failures_per_min) if options.auth_tokens else None,
    )


def _validation_split(options: ServeOptions) -> tuple[np.ndarray, np.ndarray | None] | None:
    if options.validation_data is None:
        return None
    from fedinfer.serving.predict import read_labelled

    try:
        return read_labelled(options.validation_data, label_column=options.label_column)
    except DataError as exc:
        raise ConfigError(f"`--validation-data`: {exc}") from None


def serve(options: ServeOptions) -> None:
    """Bind, then serve until SIGINT/SIGTERM (blocking).

    The socket is bound before the model loads, so ``--port 0`` works: the
    chosen port is written to ``--port-file`` (atomically) for launchers.
    With ``options.workers > 1`` this process supervises that many server
    processes (:mod:`fedinfer.serving.workers`).
    """
    options.validate()
    _check_store_path(options.model_store)
    if options.workers > 1:
        from fedinfer.serving.workers import serve_workers

        _warn_if_exposed(options)
        serve_workers(options)
        return
    app = build_app(options)
    _warn_if_exposed(options)
    sock = bind(options.host, options.port)
    url = server_url(options, sock.getsockname()[1])
    app.on_started = lambda: announce(app, url, options)
    run_app(app, options, sock, port_file=options.port_file)


def run_app(
    app: InferenceApp,
    options: ServeOptions,
    sock: socket.socket,
    *,
    port_file: Path | None = None,
    log_name: str = "%(name)s",
) -> None:
    """Serve ``app`` on the bound ``sock`` with uvicorn until SIGINT/SIGTERM (blocking)."""
    import uvicorn

    config = uvicorn_config(app, options)
    server = uvicorn.Server(config)
    # after uvicorn.Config: its dictConfig drops handlers configured earlier
    logging.basicConfig(
        level=options.log_level.upper(),
        force=True,
        format=f"%(asctime)s %(levelname)s {log_name}: %(message)s",
    )
    if port_file is not None:
        write_port_file(port_file, sock.getsockname()[1])
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    server.run(sockets=[sock])
    if not server.started:
        raise ConfigError(
            "the server did not start (see the log above): check --model-store, "
            "--backend and --public-key"
        )


def server_url(options: ServeOptions, port: int) -> str:
    """``http(s)://host:port`` of a server bound to ``port``."""
    scheme = "https" if options.tls_certfile else "http"
    return f"{scheme}://{_url_host(options.host)}:{port}"


def uvicorn_config(
    app: InferenceApp, options: ServeOptions, *, log_level: str | None = None
) -> uvicorn.Config:
    """The uvicorn settings of ``fedinfer serve`` (also used by the test harness).

    Connection limits live here: ``limit_concurrency`` (503 beyond it), the
    header timeout and pipeline bound of :mod:`fedinfer.serving.protocol`, and
    TLS 1.2+ with an explicit cipher list.
    """
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=log_level or options.log_level,
        access_log=False,  # the audit log records requests, without inputs
        http=limited_protocol(
            app.metrics,
            header_timeout_s=options.header_timeout_s,
            max_pipeline=options.max_pipeline,
        ),
        ssl_certfile=str(options.tls_certfile) if options.tls_certfile else None,
        ssl_keyfile=str(options.tls_keyfile) if options.tls_keyfile else None,
        ssl_ciphers=TLS_CIPHERS,
        timeout_keep_alive=30,
        limit_concurrency=_fd_capped(options.limit_concurrency),
        backlog=2048,
        lifespan="on",
        ws="none",  # no websockets routes; also avoids importing websockets' legacy module
        # The client address is the socket peer (used only to rate-limit failed logins);
        # X-Forwarded-* from a client would let it pick its own address.
        proxy_headers=False,
        server_header=False,
    )
    config.load()
    if options.tls_certfile is not None:  # replace uvicorn's context (its defaults vary by release)
        config.ssl = tls_context(options.tls_certfile, options.tls_keyfile)
    return config


def _fd_capped(limit: int) -> int:
    """``limit`` lowered to leave file descriptors for the store watcher and the logs.

    Past the process's fd limit new clients are reset instead of answered 503, and
    the model store cannot be read (hot swap stops), so keep 64 spare.
    """
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or limit <= soft - 64:
        return limit
    capped = max(1, soft - 64)
    logger.warning(
        "--limit-concurrency %d is above this process's file limit (ulimit -n %d): using %d",
        limit,
        soft,
        capped,
    )
    return capped


def tls_context(certfile: Path | None, keyfile: Path | None) -> ssl.SSLContext:
    """A server TLS context: TLS 1.2 minimum, :data:`TLS_CIPHERS`, no compression."""
    if certfile is None or keyfile is None:
        raise ConfigError("`--tls-certfile` and `--tls-keyfile` go together; pass both")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load `--tls-certfile` {certfile} / `--tls-keyfile` {keyfile}: {exc}"
        ) from None
    return ctx


def _check_store_path(path: Path) -> None:
    if not Path(path).exists():
        raise ConfigError(
            f"`--model-store` {path} does not exist; pass a site's store (a simulation writes "
            "<output>/sites/<site>/models, a deployment <site-dir>/models)"
        )
    if not Path(path).is_dir():
        raise ConfigError(f"`--model-store` {path} is not a directory")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def announce(
    app: InferenceApp, url: str, options: ServeOptions, *, who: str = "fedinfer serve"
) -> None:
    """Tell the user what is served where (stdout, one line each).

    A ``--workers`` process (``who`` names it) leaves the "listening" line to its parent.
    """
    current = app.manager.current
    if options.workers == 1:
        print(f"{who}: listening on {url} (model store {options.model_store})", flush=True)
    if current is None:
        print(
            f"{who}: WARNING: {options.model_store} holds no model yet; the server is "
            f"live but answers 503 until a version is published there (checked every "
            f"{options.poll_interval_s:g} s)",
            flush=True,
        )
        return
    name = current.manifest.name
    print(
        f"{who}: serving model {name!r} version {current.version} "
        f"({app.manager.backend_name} backend): POST {url}/v2/models/{name}/infer",
        flush=True,
    )


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound (not yet listening) TCP socket; ``reuse_port``: SO_REUSEPORT (``--workers``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot bind {host}:{port} ({exc.strerror}); pick another --port or 0 for a free one"
        ) from None
    sock.set_inheritable(True)
    return sock


def write_port_file(path: Path, port: int) -> None:
    """Write ``port`` to ``path`` atomically (launchers poll for it)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_if_exposed(options: ServeOptions) -> None:
    if _is_loopback(options.host):
        return
    if options.tls_certfile is None:
        logger.warning(
            "serving on %s WITHOUT TLS: requests and bearer tokens travel in clear "
            "text; pass --tls-certfile/--tls-keyfile",
            options.host,
        )
    if options.auth_tokens is None:
        logger.warning(
            "serving on %s WITHOUT authentication (--insecure): anyone who can reach it can "
            "query the model and read its metadata (rollback stays closed: it needs a "
            "token); pass --auth-tokens",
            options.host,
        )
