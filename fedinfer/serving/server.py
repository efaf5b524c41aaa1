"""Build and run the inference server from :class:`ServeOptions` (``fedinfer serve``)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedinfer.artifacts import ModelStore, load_public_key
from fedinfer.crypto.at_rest import resolve_state_key
from fedinfer.errors import ConfigError, DataError
from fedinfer.serving import DEFAULT_BACKEND, DEFAULT_MAX_BATCH_SIZE
from fedinfer.serving.app import AppLimits, InferenceApp
from fedinfer.serving.audit import AuditLog
from fedinfer.serving.auth import RateLimiter, TokenFile
from fedinfer.serving.backends import BACKEND_NAMES
from fedinfer.serving.metrics import ServingMetrics
from fedinfer.serving.model_manager import BatchingOptions, ModelManager

__all__ = ["DEFAULT_BACKEND", "ServeOptions", "build_app", "serve"]

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


def build_app(options: ServeOptions) -> InferenceApp:
    """Assemble the ASGI app (nothing is loaded until its lifespan starts)."""
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
        audit=AuditLog(audit_dir, key=state_key),
        limits=AppLimits(max_body_bytes=options.max_body_bytes, nonfinite=options.nonfinite),
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
    """
    import uvicorn

    app = build_app(options)
    _warn_if_exposed(options)
    sock = _bind(options.host, options.port)
    config = uvicorn.Config(
        app,
        log_level=options.log_level,
        access_log=False,  # the audit log records requests, without inputs
        ssl_certfile=str(options.tls_certfile) if options.tls_certfile else None,
        ssl_keyfile=str(options.tls_keyfile) if options.tls_keyfile else None,
        timeout_keep_alive=30,
        backlog=2048,
        lifespan="on",
        ws="none",  # no websockets routes; also avoids importing websockets' legacy module
        # Nothing here reads the client address, so X-Forwarded-* rewriting would only
        # parse an IP address on every request.
        proxy_headers=False,
        server_header=False,
    )
    server = uvicorn.Server(config)
    # after uvicorn.Config: its dictConfig drops handlers configured earlier
    logging.basicConfig(
        level=options.log_level.upper(),
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if options.port_file is not None:
        _write_port_file(options.port_file, sock.getsockname()[1])
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    server.run(sockets=[sock])
    if not server.started:
        raise ConfigError(
            "the server did not start (see the log above): check --model-store, "
            "--backend and --public-key"
        )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot bind {host}:{port} ({exc.strerror}); pick another --port or 0 for a free one"
        ) from None
    sock.set_inheritable(True)
    return sock


def _write_port_file(path: Path, port: int) -> None:
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
            "serving on %s WITHOUT authentication: anyone who can reach it can query "
            "the model; pass --auth-tokens",
            options.host,
        )
