"""CLI sub-commands of the serving side: serve, predict, models, tokens, audit.

Plugged into ``fedinfer`` by :mod:`fedinfer.cli` through :func:`register`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedinfer.errors import ConfigError

if TYPE_CHECKING:
    from fedinfer.artifacts import ModelStore

__all__ = ["register"]

_STATE_KEY_HELP = (
    "the site's state key (fedinfer keys init-site-key): the state is encrypted at rest "
    "(default: $FEDINFER_STATE_KEY_FILE, else plaintext)"
)


_STORE_HELP = "the site's ModelStore directory (a site's STATE_DIR/models)"
_TOKENS_HELP = "the server's tokens file (`fedinfer serve --auth-tokens`)"


def _add_state_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-key", type=Path, metavar="FILE", help=_STATE_KEY_HELP)


def _store(ns: argparse.Namespace) -> ModelStore:
    """The ``--model-store`` ModelStore, opened with ``--state-key`` if any."""
    from fedinfer.artifacts import ModelStore
    from fedinfer.crypto.at_rest import resolve_state_key

    key = resolve_state_key(ns.state_key, protects=[ns.model_store])
    return ModelStore(ns.model_store, key=key)


def register(subparsers: Any) -> None:
    """Add ``serve``, ``predict``, ``models``, ``tokens`` and ``audit`` to the ``fedinfer`` CLI."""
    _add_serve(subparsers)
    _add_predict(subparsers)
    _add_models(subparsers)
    _add_tokens(subparsers)
    _add_audit(subparsers)


# ---------------------------------------------------------------------------- serve
def _add_serve(subparsers: Any) -> None:
    from fedinfer.serving import DEFAULT_BACKEND, DEFAULT_MAX_BATCH_SIZE

    p = subparsers.add_parser(
        "serve",
        help="serve a site's model store over the Open Inference Protocol (KServe v2)",
        description="Serve the current version of a ModelStore; hot-swaps new versions.",
    )
    p.add_argument("--model-store", type=Path, required=True, help=_STORE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (default: 8080)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--tls-certfile", type=Path, help="PEM certificate (enables HTTPS)")
    p.add_argument("--tls-keyfile", type=Path, help="PEM private key of the certificate")
    p.add_argument(
        "--auth-tokens",
        type=Path,
        help="tokens file (fedinfer tokens add); without it there is no auth",
    )
    p.add_argument(
        "--public-key", type=Path, help="coordinator public key: re-verify signatures on every load"
    )
    p.add_argument(
        "--backend",
        choices=("torch", "int8", "onnx"),
        default=DEFAULT_BACKEND,
        help=f"inference backend (default: {DEFAULT_BACKEND}, fastest measured)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help=f"most rows per forward pass (default: {DEFAULT_MAX_BATCH_SIZE})",
    )
    p.add_argument("--no-batching", action="store_true", help="same as --max-batch-size 1")
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=0.0,
        help="under load, cap on waiting to fill a partial batch (default: 0)",
    )
    p.add_argument(
        "--inline-below-ms",
        type=float,
        default=0.2,
        help="run a forward pass on the event loop instead of the worker thread when recent "
        "passes of its batch size took less than this (default: 0.2; 0 = always the thread)",
    )
    p.add_argument(
        "--max-queue-size",
        type=int,
        default=1024,
        help="queued requests before 503 + Retry-After (default: 1024)",
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        help="requests/s per principal, token bucket; 0 = off (default: 0)",
    )
    p.add_argument("--rate-burst", type=float, help="token bucket size (default: the rate)")
    p.add_argument(
        "--max-body-bytes", type=int, default=8 << 20, help="largest request body (default: 8 MiB)"
    )
    p.add_argument(
        "--nonfinite",
        choices=("reject", "allow"),
        default="reject",
        help="NaN/inf inputs: 400 (reject, default) or pass through (allow)",
    )
    p.add_argument(
        "--audit-dir", type=Path, help="audit log directory (default: <model-store>/../audit)"
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=0.5,
        help="seconds between checks of the store's CURRENT (default: 0.5)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes sharing the port (default: 1); a parent restarts one that "
        "dies; rate and login limits count per worker (Linux; see the README's "
        "'Several server processes')",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of the inference worker (default: 1; the event loop "
        "needs a core of its own; raise on bigger machines)",
    )
    p.add_argument(
        "--validation-data",
        type=Path,
        help="labelled CSV/Parquet/NPZ split: refuse a backend that loses accuracy",
    )
    p.add_argument("--label-column", default="label", help="label column of --validation-data")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.01,
        help="tolerated accuracy drop of int8/onnx/pruned vs float (default: 0.01)",
    )
    _add_prune_amount(p)
    _add_limits(p)
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="server log level (default: info)",
    )
    _add_state_key(p)
    p.set_defaults(func=_serve)


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve on a non-loopback --host without TLS and --auth-tokens (anyone who can "
        "reach it may query the model; rollback still needs a token)",
    )
    p.add_argument(
        "--keep-versions",
        type=int,
        default=2,
        metavar="N",
        help="versions servable by number: the current one and the N-1 served before it "
        "(default: 2); other versions answer 404, never loaded on request",
    )
    p.add_argument(
        "--pin-versions",
        type=_int_list,
        default=(),
        metavar="V[,V...]",
        help="stored versions loaded at start and always servable by number",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="close a connection whose request headers take longer (default: 10)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="answer 408 when a request body takes longer (default: 30)",
    )
    p.add_argument(
        "--limit-concurrency",
        type=int,
        default=512,
        metavar="N",
        help="open connections + requests in flight before 503 (default: 512; keep it "
        "under the process's file limit, `ulimit -n`)",
    )
    p.add_argument(
        "--max-pipeline",
        type=int,
        default=16,
        metavar="N",
        help="pipelined requests queued per connection before reading pauses (default: 16)",
    )
    p.add_argument(
        "--login-failures-per-min",
        type=float,
        default=10.0,
        metavar="N",
        help="wrong tokens per client address and minute before 429 (default: 10)",
    )


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected versions like 3,5 (got {text!r})") from None


def _add_prune_amount(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prune-amount",
        type=float,
        default=0.0,
        help="zero this share of the smallest weights before building the backend "
        "(global magnitude pruning, 0 = off; no speed-up on dense CPU kernels, "
        "see bench/results/serving.md)",
    )


def _serve(ns: argparse.Namespace) -> int:
    from fedinfer.serving.server import ServeOptions, serve

    options = ServeOptions(
        model_store=ns.model_store,
        host=ns.host,
        port=ns.port,
        port_file=ns.port_file,
        tls_certfile=ns.tls_certfile,
        tls_keyfile=ns.tls_keyfile,
        auth_tokens=ns.auth_tokens,
        public_key=ns.public_key,
        backend=ns.backend,
        max_batch_size=1 if ns.no_batching else ns.max_batch_size,
        max_queue_delay_ms=ns.max_queue_delay_ms,
        max_queue_size=ns.max_queue_size,
        inline_below_ms=ns.inline_below_ms,
        rate_limit=ns.rate_limit,
        rate_burst=ns.rate_burst,
        max_body_bytes=ns.max_body_bytes,
        nonfinite=ns.nonfinite,
        audit_dir=ns.audit_dir,
        poll_interval_s=ns.poll_interval,
        threads=ns.threads,
        validation_data=ns.validation_data,
        label_column=ns.label_column,
        max_accuracy_drop=ns.max_accuracy_drop,
        prune_amount=ns.prune_amount,
        log_level=ns.log_level,
        state_key=ns.state_key,
        insecure=ns.insecure,
        keep_versions=ns.keep_versions,
        pin_versions=ns.pin_versions,
        header_timeout_s=ns.header_timeout,
        body_timeout_s=ns.body_timeout,
        limit_concurrency=ns.limit_concurrency,
        max_pipeline=ns.max_pipeline,
        login_failures_per_min=ns.login_failures_per_min,
        workers=ns.workers,
    )
    serve(options)
    return 0


# -------------------------------------------------------------------------- predict
def _add_predict(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict", help="score a CSV / Parquet / NPZ file with the store's current model"
    )
    p.add_argument("--model-store", type=Path, required=True, help=_STORE_HELP)
    p.add_argument("--input", type=Path, required=True, help=".csv, .parquet or .npz")
    p.add_argument("--output", type=Path, required=True, help=".csv, .parquet or .npz")
    p.add_argument("--id-column", help="column (NPZ: array) that identifies rows")
    p.add_argument(
        "--label-column",
        default="label",
        help="column skipped as a feature if present (default: label)",
    )
    header = p.add_mutually_exclusive_group()
    header.add_argument(
        "--no-header",
        dest="header",
        action="store_false",
        default=None,
        help="CSV has no header row: read row 1 as data, name columns 0, 1, ... "
        "(default: refuse a first row whose names are all numbers)",
    )
    header.add_argument(
        "--header",
        dest="header",
        action="store_true",
        help="CSV's first row is its header even if every name is a number",
    )
    p.add_argument("--version", type=int, help="score with this stored version (default: current)")
    p.add_argument(
        "--backend",
        choices=("torch", "int8", "onnx"),
        default="torch",
        help="inference backend (default: torch)",
    )
    _add_prune_amount(p)
    p.add_argument(
        "--public-key",
        type=Path,
        help="coordinator public key: re-verify the model's signature first",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=8192,
        help="rows read and scored at a time (default: 8192)",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_state_key(p)
    p.set_defaults(func=_predict)


def _predict(ns: argparse.Namespace) -> int:
    from fedinfer.artifacts import load_public_key
    from fedinfer.reporting.text import plural
    from fedinfer.serving.predict import predict_file

    if ns.chunk_size < 1:
        raise ConfigError("`--chunk-size` must be >= 1")
    report = predict_file(
        _store(ns),
        input_path=ns.input,
        output_path=ns.output,
        id_column=ns.id_column,
        label_column=ns.label_column,
        chunk_size=ns.chunk_size,
        strict=ns.strict,
        backend=ns.backend,
        prune_amount=ns.prune_amount,
        version=ns.version,
        progress=not ns.no_progress,
        public_key=load_public_key(ns.public_key) if ns.public_key else None,
        header=ns.header,
    )
    for row, reason in report.bad_rows[:20]:
        print(f"row {row}: {reason}", file=sys.stderr)
    if len(report.bad_rows) > 20:
        print(
            f"... and {plural(len(report.bad_rows) - 20, 'more bad row')} "
            "(see the 'error' column)",
            file=sys.stderr,
        )
    print(
        f"scored {report.rows - len(report.bad_rows)} of {plural(report.rows, 'row')} with "
        f"version {report.model_version} -> {report.output}"
    )
    return 0


# --------------------------------------------------------------------------- models
def _add_models(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="inspect or roll back a site's model store")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="stored versions and which one is current")
    ls.add_argument("--model-store", type=Path, required=True, help=_STORE_HELP)
    _add_state_key(ls)
    ls.set_defaults(func=_models_list)
    rb = sub.add_parser("rollback", help="serve an older version again (servers follow)")
    rb.add_argument("--model-store", type=Path, required=True, help=_STORE_HELP)
    rb.add_argument("--to", type=int, help="version (default: the newest older than current)")
    _add_state_key(rb)
    rb.set_defaults(func=_models_rollback)


def _models_list(ns: argparse.Namespace) -> int:
    from rich.table import Table

    from fedinfer.console import make_console

    store = _store(ns)
    current = store.current_version()
    table = Table(title=f"Model store {ns.model_store}", header_style="bold")
    for header in ("current", "version", "round", "created (UTC)", "name", "model"):
        table.add_column(header, justify="right" if header in ("version", "round") else "left")
    table.add_column("metrics")
    table.add_column("privacy")
    for version in store.versions():
        m = store.manifest(version)
        table.add_row(
            "*" if version == current else "",
            f"v{version}",
            str(m.server_round),
            m.created,
            m.name,
            str(m.model.get("name", "")),
            _pairs(m.metrics),
            _pairs(m.privacy),
        )
    console = make_console()
    console.print(table)
    if current is None:
        console.print("(no current version)")
    return 0


def _pairs(values: dict[str, Any]) -> str:
    """``accuracy=0.91 loss=0.3``: floats to 4 significant digits."""
    shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    return " ".join(shown)


def _models_rollback(ns: argparse.Namespace) -> int:
    store = _store(ns)
    before = store.current_version()
    version = store.rollback(ns.to)
    print(f"current version {before} -> {version}")
    return 0


# --------------------------------------------------------------------------- tokens
def _add_tokens(subparsers: Any) -> None:
    p = subparsers.add_parser("tokens", help="manage the server's bearer tokens")
    sub = p.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="create a token (printed once; only its hash is stored)")
    add.add_argument("--file", type=Path, required=True, help=_TOKENS_HELP)
    add.add_argument(
        "--principal", required=True, help="who the token is for (its name in the audit log)"
    )
    add.add_argument(
        "--role", action="append", choices=("infer", "admin"), required=True, help="repeatable"
    )
    add.add_argument("--rate-limit", type=float, help="requests/s for this principal")
    add.set_defaults(func=_tokens_add)
    rev = sub.add_parser("revoke", help="delete every token of a principal")
    rev.add_argument("--file", type=Path, required=True, help=_TOKENS_HELP)
    rev.add_argument("--principal", required=True, help="whose tokens to delete")
    rev.set_defaults(func=_tokens_revoke)


def _tokens_add(ns: argparse.Namespace) -> int:
    from fedinfer.serving.auth import add_token

    token = add_token(ns.file, principal=ns.principal, roles=ns.role, rate_limit=ns.rate_limit)
    print(token)
    print(
        f"(token for {ns.principal!r}, roles {sorted(set(ns.role))}; it is not stored and "
        "will not be shown again)",
        file=sys.stderr,
    )
    return 0


def _tokens_revoke(ns: argparse.Namespace) -> int:
    from fedinfer.serving.auth import revoke_tokens

    print(f"revoked {revoke_tokens(ns.file, principal=ns.principal)} token(s)")
    return 0


# ---------------------------------------------------------------------------- audit
def _add_audit(subparsers: Any) -> None:
    p = subparsers.add_parser("audit", help="summarize a site server's audit log")
    sub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    s = sub.add_parser("summary", help="usage per principal; flag request-rate spikes")
    s.add_argument("dir", type=Path, help="the audit directory")
    s.add_argument("--window", type=float, default=60.0, help="seconds per rate window")
    s.add_argument(
        "--spike-factor",
        type=float,
        default=10.0,
        help="flag a window above this multiple of the baseline (default: 10)",
    )
    s.add_argument(
        "--min-requests",
        type=int,
        default=20,
        help="never flag a window with fewer requests (default: 20)",
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _add_state_key(s)
    s.set_defaults(func=_audit_summary)


def _audit_summary(ns: argparse.Namespace) -> int:
    from fedinfer.crypto.at_rest import resolve_state_key
    from fedinfer.serving.audit import summarize_audit

    usage = summarize_audit(
        ns.dir,
        key=resolve_state_key(ns.state_key, protects=[ns.dir]),
        window_s=ns.window,
        spike_factor=ns.spike_factor,
        min_requests=ns.min_requests,
    )
    if ns.json:
        print(json.dumps([u.to_dict() for u in usage], indent=2))
        return 0
    print(
        f"{'principal':<20} {'requests':>9} {'rows':>9} {'errors':>7} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'baseline/w':>10} {'peak/w':>7}  flag"
    )
    for u in usage:
        d = u.to_dict()
        base = "-" if d["baseline_per_window"] is None else f"{d['baseline_per_window']:.1f}"
        print(
            f"{u.principal:<20} {d['requests']:>9} {d['rows']:>9} {d['errors']:>7} "
            f"{_ms(d['p50_ms']):>8} {_ms(d['p99_ms']):>8} {base:>10} {d['peak_per_window']:>7}"
            f"  {'SPIKE at ' + str(d['peak_start']) if u.flagged else ''}"
        )
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
