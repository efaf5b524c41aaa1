"""The site inference server as a plain ASGI application (no framework).

Routes (KServe v2 / Open Inference Protocol REST, plus metrics and admin)::

    GET  /v2/health/live | /v2/health/ready             open (probes)
    GET  /metrics                                       open (Prometheus)
    GET  /v2                                            open (server metadata)
    GET  /v2/models/{name}[/versions/{v}]               role infer
    GET  /v2/models/{name}[/versions/{v}]/ready         role infer
    POST /v2/models/{name}[/versions/{v}]/infer         role infer
    POST /v2/repository/models/{name}/rollback          role admin  body {"version": int | null}

Without ``--auth-tokens`` every caller is ``anonymous`` and holds ``infer`` only, so
rollback always needs a token. A ``/versions/{v}`` segment is ASCII digits without
leading zeros, and names a version the manager already serves (never loaded on request).

A plain ASGI callable rather than FastAPI: the hot path is a handful of
dict lookups, and skipping request-model validation and middleware stacks
saves server CPU per request, which is what a 2-core site box runs out of
first (see bench/results/serving.md). Every error is a 4xx/5xx with the OIP
body ``{"error": "..."}``; a bad request never produces a 5xx.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import math
import re
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from fedinfer.errors import ConfigError, ModelIntegrityError
from fedinfer.serving import DEFAULT_MAX_BATCH_SIZE
from fedinfer.serving.audit import AuditLog, AuditPipe
from fedinfer.serving.auth import ANONYMOUS, LoginLimiter, Principal, RateLimiter, TokenFile
from fedinfer.serving.batcher import BatcherClosed, Overloaded
from fedinfer.serving.metrics import ServingMetrics
from fedinfer.serving.model_manager import (
    LoadedModel,
    ModelManager,
    ModelNotFound,
    ModelNotReady,
)
from fedinfer.serving.oip import HEADER_LENGTH, OipError, encode_infer_response, parse_infer_request
from fedinfer.tasks import output_specs, task_spec

__all__ = ["OUTPUT_NAMES", "AppLimits", "InferenceApp"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OUTPUT_NAMES: tuple[str, ...] = ("logits", "probabilities", "predicted_class")
"""The outputs of a multiclass (and binary) model; other tasks serve their own
(:func:`fedinfer.tasks.task_spec`: ``predicted_labels``, ``values``)."""
_MODEL_ROUTE = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?/?$"
)
_ROLLBACK_ROUTE = re.compile(r"^/v2/repository/models/(?P<name>[^/]+)/rollback/?$")
_VERSION = re.compile(r"0|[1-9][0-9]{0,11}", re.ASCII)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Generated request ids: a random per-process prefix and a counter (32 hex digits like a
# uuid4 hex, unique within the process, unguessable across processes) instead of
# uuid4(), whose os.urandom call is a syscall on every request.
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()
# Above these sizes, decoding / encoding runs in a thread so the event loop keeps serving.
_INLINE_BYTES = 256 * 1024
_INLINE_ROWS = 2048


@dataclass(frozen=True)
class AppLimits:
    """Request limits and input policy."""

    max_body_bytes: int = 8 << 20
    nonfinite: str = "reject"
    """``reject`` (400 on NaN/inf inputs) or ``allow``."""
    body_timeout_s: float = 30.0
    """The whole request body must arrive within this many seconds of its headers (else 408)."""
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    """Rows per forward pass: a larger request runs as several passes of at most this many."""

    def __post_init__(self) -> None:
        if self.nonfinite not in ("reject", "allow"):
            raise ConfigError(f"`--nonfinite` must be 'reject' or 'allow' (got {self.nonfinite!r})")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"`--max-body-bytes` must be >= 1024 (got {self.max_body_bytes})")


class HttpError(Exception):
    """Answer the request with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or []


@dataclass
class _Exchange:
    """What one request did, for the response headers, metrics and the audit line."""

    method: str
    path: str
    headers: dict[bytes, bytes]
    request_id: str
    client: str = "unknown"
    endpoint: str = "other"
    principal: str | None = None
    model: str | None = None
    version: int | None = None
    rows: int = 0
    batch_size: int = 0
    audited: bool = True
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class InferenceApp:
    """ASGI application serving one site's ModelStore.

    Parameters
    ----------
    manager : ModelManager
        Loads, batches and hot-swaps model versions.
    metrics : ServingMetrics
        Exposed at ``/metrics``.
    tokens : TokenFile or None
        Bearer tokens; None: every caller is ``anonymous``, who may infer but not administer.
    rate_limiter : RateLimiter or None
        Per-principal token buckets; None disables rate limiting.
    audit : AuditLog, AuditPipe or None
        Where one line per request goes (``--workers N``: a pipe to the parent, which writes).
    limits : AppLimits
        Body size and timeout, rows per forward pass, NaN/inf policy.
    login_limiter : LoginLimiter or None
        Failed-login budget per client address (429 once spent).
    """

    def __init__(
        self,
        manager: ModelManager,
        *,
        metrics: ServingMetrics,
        tokens: TokenFile | None = None,
        rate_limiter: RateLimiter | None = None,
        audit: AuditLog | AuditPipe | None = None,
        limits: AppLimits | None = None,
        login_limiter: LoginLimiter | None = None,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.tokens = tokens
        self.rate_limiter = rate_limiter
        self.audit = audit
        self.limits = limits or AppLimits()
        self.login_limiter = login_limiter
        self.on_started: Callable[[], None] | None = None
        """Called once the lifespan startup loaded the model (``fedinfer serve`` prints)."""
        self.response_headers: list[tuple[bytes, bytes]] = []
        """Sent with every response (``--workers N``: ``x-fedinfer-worker``)."""

    # ------------------------------------------------------------------ ASGI entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers", []))
        peer = scope.get("client")
        ex = _Exchange(
            scope["method"],
            scope["path"],
            headers,
            _request_id(headers),
            client=str(peer[0]) if peer else "unknown",
        )
        try:
            status, resp_headers, body = await self._dispatch(ex, receive)
        except HttpError as exc:
            status, resp_headers, body = exc.status, exc.headers, _error_body(str(exc))
        except Exception:  # a bug: answer 500, log it, keep serving
            logger.exception(
                "unhandled error on %s %s (request %s)", ex.method, ex.path, ex.request_id
            )
            status, resp_headers, body = 500, [], _error_body("internal server error")
        await _respond(
            send,
            status,
            resp_headers + ex.extra_headers + self.response_headers,
            body,
            ex.request_id,
        )
        self._record(ex, status, time.perf_counter() - started)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.manager.start()
                except Exception as exc:
                    logger.error("server startup failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
                if self.on_started is not None:
                    self.on_started()
            elif message["type"] == "lifespan.shutdown":
                await self.manager.stop()
                if self.audit is not None:
                    self.audit.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _record(self, ex: _Exchange, status: int, seconds: float) -> None:
        self.metrics.count_request(ex.endpoint, status)
        if ex.endpoint == "infer":
            self.metrics.infer_latency.observe(seconds)
        self.metrics.queue_depth.set(self.manager.queue_depth)
        if self.audit is not None and ex.audited:
            self.audit.write(
                {
                    "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
                    "request_id": ex.request_id,
                    "principal": ex.principal,
                    "method": ex.method,
                    "endpoint": ex.endpoint,
                    "model": ex.model,
                    "version": ex.version,
                    "rows": ex.rows,
                    "batch_size": ex.batch_size,
                    "latency_ms": round(seconds * 1000.0, 3),
                    "status": status,
                }
            )

    # ------------------------------------------------------------------- routing
    async def _dispatch(
        self, ex: _Exchange, receive: Receive
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        path = ex.path
        if path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/v2", "/v2/"):
            ex.audited = False
            ex.endpoint = path.strip("/").replace("/", "_") or "server"
            _require_method(ex, "GET")
            return self._open_endpoint(path)
        match = _MODEL_ROUTE.match(path)
        if match is not None:
            ex.endpoint = {None: "metadata", "/ready": "ready", "/infer": "infer"}[match["action"]]
            _require_method(ex, "POST" if ex.endpoint == "infer" else "GET")
            self._authorize(ex, "infer")
            version = _parse_version(match["version"])
            self._check_name(match["name"])
            ex.model, ex.version = match["name"], version
            if ex.endpoint == "infer":
                body = await self._read_body(ex, receive)
                return await self._infer(ex, body, version)
            if ex.endpoint == "ready":
                return await self._model_ready(version)
            return await self._model_metadata(version)
        match = _ROLLBACK_ROUTE.match(path)
        if match is not None:
            ex.endpoint = "rollback"
            _require_method(ex, "POST")
            self._authorize(ex, "admin")
            self._check_name(match["name"])
            return await self._rollback(ex, await self._read_body(ex, receive))
        ex.audited = False
        raise HttpError(404, f"no route {path}")

    def _open_endpoint(self, path: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if path == "/metrics":
            return 200, [(b"content-type", b"text/plain; version=0.0.4")], self.metrics.render()
        if path == "/v2/health/live":
            return 200, [], _json_body({"live": True})
        if path == "/v2/health/ready":
            ready = self.manager.current is not None
            return (200 if ready else 503), [], _json_body({"ready": ready})
        from fedinfer.serving import __version__

        return (
            200,
            [],
            _json_body(
                {"name": "fedinfer", "version": __version__, "extensions": ["binary_tensor_data"]}
            ),
        )

    def _authorize(self, ex: _Exchange, role: str) -> Principal:
        principal = ANONYMOUS if self.tokens is None else self._authenticate(ex)
        ex.principal = principal.name
        if not principal.can(role):
            if principal is ANONYMOUS:
                raise HttpError(
                    403,
                    f"{ex.endpoint} needs the {role!r} role, and a server without "
                    "--auth-tokens serves inference only; restart it with --auth-tokens "
                    f"and use a token made by `fedinfer tokens add --role {role}`",
                )
            raise HttpError(403, f"principal {principal.name!r} lacks the {role!r} role")
        if self.rate_limiter is not None:
            wait = self.rate_limiter.acquire(principal)
            if wait > 0:
                raise HttpError(
                    429, "rate limit exceeded", [(b"retry-after", str(math.ceil(wait)).encode())]
                )
        return principal

    def _authenticate(self, ex: _Exchange) -> Principal:
        assert self.tokens is not None
        if self.login_limiter is not None:  # before the token is even looked at
            wait = self.login_limiter.wait_s(ex.client)
            if wait > 0:
                raise HttpError(
                    429,
                    "too many failed logins from this address; retry later",
                    [(b"retry-after", str(math.ceil(wait)).encode())],
                )
        header = ex.headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        challenge = [(b"www-authenticate", b'Bearer realm="fedinfer"')]
        if scheme.lower() != "bearer" or not token.strip():
            raise HttpError(
                401, "missing bearer token (send 'Authorization: Bearer <token>')", challenge
            )
        principal = self.tokens.authenticate(token.strip())
        if principal is None:
            if self.login_limiter is not None:
                self.login_limiter.failed(ex.client)
            raise HttpError(401, "invalid bearer token", challenge)
        return principal

    def _check_name(self, name: str) -> None:
        served = self.manager.name
        if served is None:
            raise HttpError(503, "no model is loaded yet")
        if name != served:
            raise HttpError(404, f"unknown model {name!r} (this server serves {served!r})")

    async def _read_body(self, ex: _Exchange, receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = ex.headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HttpError(413, f"request body of {int(declared)} bytes exceeds {limit}")
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HttpError(
                    408,
                    f"request body not received within {self.limits.body_timeout_s:g} s",
                    [(b"connection", b"close")],
                ) from None
            if message["type"] == "http.disconnect":
                raise HttpError(499, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"request body exceeds {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return _decode_body(b"".join(chunks), ex.headers.get(b"content-encoding"), limit)

    # ------------------------------------------------------------------ endpoints
    async def _infer(
        self, ex: _Exchange, body: bytes, version: int | None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        header_length = _header(ex.headers, HEADER_LENGTH.encode())
        try:
            if len(body) > _INLINE_BYTES:  # parsing megabytes of JSON would stall the loop
                request = await asyncio.to_thread(
                    parse_infer_request, body, header_length=header_length
                )
            else:
                request = parse_infer_request(body, header_length=header_length)
        except OipError as exc:
            raise HttpError(exc.status, str(exc)) from None
        model = await self._resolve(version)
        x = self._validate_input(request.inputs, model)
        available = task_spec(model.manifest.task_kind).outputs
        wanted = _requested_outputs(request.outputs, request.binary_output, available)
        ex.rows = len(x)
        outputs, batch_size, model = await self._submit(x, model, version)
        ex.version, ex.batch_size = model.version, batch_size
        if any(name not in outputs for name, _ in wanted):  # swapped to a model of another task
            raise HttpError(409, "the model changed to another task mid-request; retry")
        encode = functools.partial(
            encode_infer_response,
            model_name=model.manifest.name,
            model_version=str(model.version),
            request_id=request.id,
            outputs=[(name, outputs[name], binary) for name, binary in wanted],
        )
        body_out, header_len = (
            await asyncio.to_thread(encode) if len(x) > _INLINE_ROWS else encode()
        )
        headers = [(b"x-model-version", str(model.version).encode())]
        if header_len is None:
            return 200, headers, body_out
        return (
            200,
            headers
            + [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(header_len).encode()),
            ],
            body_out,
        )

    async def _resolve(self, version: int | None) -> LoadedModel:
        try:
            return await self.manager.get(version)
        except ModelNotFound as exc:
            raise HttpError(404, str(exc)) from None
        except ModelNotReady as exc:
            raise HttpError(503, str(exc), [(b"retry-after", b"1")]) from None

    async def _submit(
        self, x: np.ndarray, model: LoadedModel, version: int | None
    ) -> tuple[dict[str, np.ndarray], int, LoadedModel]:
        step = self.limits.max_batch_size
        if len(x) <= step:
            return await self._submit_chunk(x, model, version)
        # A request larger than --max-batch-size runs as several forward passes of at
        # most that many rows, queued one after another, so its memory is bounded and
        # other clients' requests are batched in between. Every chunk is answered by
        # the version that answered the first one.
        parts, largest = [], 0
        for start in range(0, len(x), step):
            outputs, batch_size, model = await self._submit_chunk(
                x[start : start + step], model, version
            )
            version = model.version
            parts.append(outputs)
            largest = max(largest, batch_size)
        merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        return merged, largest, model

    async def _submit_chunk(
        self, x: np.ndarray, model: LoadedModel, version: int | None
    ) -> tuple[dict[str, np.ndarray], int, LoadedModel]:
        for _ in range(3):  # the resolved version may be retired between resolve and submit
            try:
                outputs, batch_size = await model.batcher.submit(x)
                return outputs, batch_size, model
            except BatcherClosed:
                model = await self._resolve(version)
            except Overloaded as exc:
                raise HttpError(
                    503, str(exc), [(b"retry-after", str(math.ceil(exc.retry_after_s)).encode())]
                ) from None
        raise HttpError(503, "model version changed repeatedly; retry", [(b"retry-after", b"1")])

    def _validate_input(self, inputs: tuple[Any, ...], model: LoadedModel) -> np.ndarray:
        spec = model.manifest.inputs[0]
        if len(inputs) != 1:
            raise HttpError(400, f"expected exactly one input {spec.name!r}, got {len(inputs)}")
        tensor = inputs[0]
        if tensor.name != spec.name:
            raise HttpError(400, f"unknown input {tensor.name!r}; expected {spec.name!r}")
        if tensor.datatype != spec.datatype:
            raise HttpError(
                400, f"input {spec.name!r} must be {spec.datatype}, got {tensor.datatype}"
            )
        d = model.manifest.input_dim
        sample = list(model.manifest.input_shape)
        # The manifest's shape ([batch, 1, 8, 8]), or its flat form [batch, 64].
        if tuple(tensor.shape[1:]) not in (tuple(sample), (d,)):
            flat = f" or [batch, {d}]" if len(sample) > 1 else ""
            raise HttpError(
                400,
                f"input {spec.name!r} must have shape [batch, {', '.join(map(str, sample))}]"
                f"{flat}, got {list(tensor.shape)}",
            )
        if tensor.shape[0] == 0:
            raise HttpError(400, f"input {spec.name!r} is an empty batch")
        x: np.ndarray = tensor.array
        if x.ndim != 2:
            x = x.reshape(x.shape[0], d)  # backends take flat rows; the model reshapes them
        # The common path is one elementwise test and one reduction; the rows are only
        # located for the error message.
        if self.limits.nonfinite == "reject" and not np.isfinite(x).all():
            bad = ~np.isfinite(x).all(axis=1)
            if bad.any():
                rows = np.flatnonzero(bad)[:10].tolist()
                raise HttpError(
                    400,
                    f"input {spec.name!r} has NaN or infinite values in rows "
                    f"{rows}{' ...' if bad.sum() > 10 else ''}",
                )
        return x

    async def _model_ready(
        self, version: int | None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if version is None:
            ready = self.manager.current is not None
            return (200 if ready else 503), [], _json_body({"ready": ready})
        try:  # ready means servable: loaded under the version policy (as infer would)
            await self.manager.get(version)
        except ModelNotFound:
            return 404, [], _json_body({"ready": False})
        except ModelNotReady:
            return 503, [], _json_body({"ready": False})
        return 200, [], _json_body({"ready": True})

    async def _model_metadata(
        self, version: int | None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        store = self.manager.store
        try:
            versions = await asyncio.to_thread(store.versions)
            if version is not None and version not in versions:
                raise HttpError(404, f"version {version} is not in the model store")
            current = self.manager.current
            assert current is not None
            manifest = (
                current.manifest
                if version in (None, current.version)
                else (await asyncio.to_thread(store.manifest, version))
            )
        except ModelIntegrityError as exc:
            logger.error("metadata of version %s unreadable: %s", version, exc)
            raise HttpError(
                404, f"version {version} cannot be read (details in the server log)"
            ) from None
        spec = manifest.inputs[0].to_dict()
        return (
            200,
            [],
            _json_body(
                {
                    "name": manifest.name,
                    "versions": [str(v) for v in versions],
                    "platform": f"fedinfer_{self.manager.backend_name}",
                    "inputs": [spec],
                    "outputs": output_specs(manifest.task_kind, manifest.num_classes),
                    "parameters": {
                        "task": manifest.task_kind,
                        "version": manifest.version,
                        "current_version": current.version,
                        "server_round": manifest.server_round,
                        "created": manifest.created,
                        "run_id": manifest.run_id,
                        "metrics": manifest.metrics,
                        "privacy": manifest.privacy,
                        "class_labels": list(manifest.class_labels)
                        if manifest.class_labels
                        else None,
                    },
                }
            ),
        )

    async def _rollback(
        self, ex: _Exchange, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        try:
            doc = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError):  # any bytes at all: 400, never a 500
            raise HttpError(400, 'rollback body must be JSON like {"version": 3}') from None
        target = doc.get("version") if isinstance(doc, dict) else None
        if target is not None and type(target) is not int:
            raise HttpError(400, "'version' must be an integer or null")
        store = self.manager.store
        try:
            version = await asyncio.to_thread(store.rollback, target)
        except ConfigError as exc:  # its text names the store's path: log it, answer without
            logger.warning("rollback to %s refused: %s", target, exc)
            stored = await asyncio.to_thread(store.versions)
            what = "nothing older to roll back to" if target is None else "no such stored version"
            raise HttpError(409, f"cannot roll back: {what} (stored versions: {stored})") from None
        except ModelIntegrityError as exc:
            logger.error("rollback to %s refused: %s", target, exc)
            raise HttpError(
                409,
                "refusing to roll back: the target version fails its integrity check "
                "(details in the server log)",
            ) from None
        await self.manager.refresh()
        ex.version = version
        logger.warning("admin %r rolled model back to version %d", ex.principal, version)
        return 200, [], _json_body({"model_name": self.manager.name, "model_version": str(version)})


def _require_method(ex: _Exchange, method: str) -> None:
    if ex.method != method:
        raise HttpError(
            405,
            f"{ex.method} not allowed on {ex.path}; use {method}",
            [(b"allow", method.encode())],
        )


def _parse_version(raw: str | None) -> int | None:
    if raw is None:
        return None
    # ASCII digits only, no leading zeros: str.isdigit() also accepts '²' and '١' (int()
    # then fails or aliases another version), and '001' would alias version 1.
    if _VERSION.fullmatch(raw) is None:
        raise HttpError(
            404, f"unknown model version {raw!r} (versions are integers like 3, no leading zeros)"
        )
    return int(raw)


def _decode_body(body: bytes, encoding: bytes | None, limit: int) -> bytes:
    """Undo a gzip/deflate ``Content-Encoding`` (tritonclient's request compression).

    The decompressed size is held to the same limit as a plain body, so a small
    compressed bomb cannot expand in memory.
    """
    name = (encoding or b"identity").strip().lower()
    if name == b"identity":
        return body
    wbits = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": 0}.get(name)
    if wbits is None:
        raise HttpError(
            415,
            f"unsupported Content-Encoding {name.decode('latin-1')!r}; send identity, gzip "
            "or deflate",
            [(b"accept-encoding", b"gzip, deflate")],
        )
    if wbits == 0:  # deflate: RFC 9110 says zlib-wrapped, but some clients send raw deflate
        wbits = zlib.MAX_WBITS if body[:1] and (body[0] & 0x0F) == 8 else -zlib.MAX_WBITS
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HttpError(400, f"request body is not valid {name.decode()} data: {exc}") from None
    if len(out) > limit or decoder.unconsumed_tail:
        raise HttpError(413, f"decompressed request body exceeds {limit} bytes")
    if not decoder.eof:
        raise HttpError(400, f"request body is truncated {name.decode()} data")
    return out


def _requested_outputs(
    requested: tuple[Any, ...] | None,
    binary_default: bool,
    available: tuple[str, ...] = OUTPUT_NAMES,
) -> list[tuple[str, bool]]:
    if requested is None:
        return [(name, binary_default) for name in available]
    unknown = [o.name for o in requested if o.name not in available]
    if unknown:
        raise HttpError(400, f"unknown output(s) {unknown}; available: {list(available)}")
    return [(o.name, o.binary) for o in requested]


def _request_id(headers: dict[bytes, bytes]) -> str:
    raw = headers.get(b"x-request-id")
    if raw is not None:
        given = raw.decode("latin-1")
        if _REQUEST_ID.match(given):
            return given
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def _json_body(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def _error_body(message: str) -> bytes:
    return _json_body({"error": message})


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, request_id: str
) -> None:
    names = {k for k, _ in headers}
    full = list(headers)
    if b"content-type" not in names:
        full.append((b"content-type", b"application/json"))
    full += [(b"content-length", str(len(body)).encode()), (b"x-request-id", request_id.encode())]
    try:
        await send({"type": "http.response.start", "status": status, "headers": full})
        await send({"type": "http.response.body", "body": body})
    except OSError:
        pass  # client went away; nothing to answer
