"""``fedinfer site``: one site's SuperNode and its long-lived inference server, supervised.

Processes (logs under ``<state-dir>/logs/``)::

    fedinfer site           this supervisor; Ctrl-C / SIGTERM stops all children
    ├── flower-supernode    TLS to the coordinator's gateway, authenticated by node.key;
    │                       `--isolation process`: it runs no app code, and holds each message
    │                       as a task on its Runtime API (127.0.0.1 only) that only a holder
    │                       of runtime.secret may claim
    ├── site worker         claims those tasks and runs the site's OWN ClientApp on them
    │                       (policy, ledger, training, secure aggregation) with data and
    │                       libraries loaded once; the coordinator's app bundle is never
    │                       installed or imported (fedinfer.deploy.site_worker)
    └── fedinfer serve      KServe v2 server on the site's ModelStore; hot-swaps new versions

State directory (everything the site knows; survives restarts)::

    <state-dir>/
      models/            ModelStore: verified, signed versions; CURRENT switched atomically
      ledger.json        the site's privacy ledger (cumulative epsilon)
      audit/             the inference server's audit log
      at-rest.json       with --state-key: which key encrypts the three above (no secret)
      site_policy.toml   the site's policy (default place; `fedinfer site init-policy`): every
                         request of the coordinator is checked against it (fedinfer.policy)
      node-config.toml   what the ClientApp learns about this site (name, data, state, keys)
      site.json          pids and ports, for `fedinfer status`
      flwr/              the SuperNode's FLWR_HOME
      runtime.secret     signs the worker's task claims (0600; new at every start)
      logs/              worker.log, supernode.log, serve.log

With ``--state-key FILE`` (a key from ``fedinfer keys init-site-key``, kept outside
the state directory) the model store, the ledger and the audit log are encrypted
at rest: the ClientApp (through the node config, and ``$FEDINFER_STATE_KEY_FILE``
in its environment) and ``fedinfer serve`` (``--state-key``) both get the key's
*path*, never the key itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedinfer.crypto.at_rest import (
    KEY_ENV_VAR,
    StateKey,
    check_state_dir,
    is_sealed,
    mark_state_dir,
    resolve_state_key,
)
from fedinfer.data.federated import DATA_FUNCTION_PREFIX
from fedinfer.deploy.flower import flower_env, supernode_argv
from fedinfer.deploy.process import (
    ManagedProcess,
    Shutdown,
    free_port,
    signals_raise_shutdown,
    wait_until,
)
from fedinfer.deploy.sitedata import data_spec, inspect_site_data
from fedinfer.deploy.supernode import (
    DEFAULT_IDLE_POLL_S,
    FLOWER_IDLE_SLEEP_S,
    write_runtime_secret,
)
from fedinfer.errors import ConfigError, FedInferError, StateKeyError
from fedinfer.fl.run_config import NodeConfigKeys
from fedinfer.reporting.results import write_json_atomic

__all__ = [
    "SiteLayout",
    "SiteOptions",
    "check_policy",
    "node_config_toml",
    "policy_path",
    "run_site",
    "serving_available",
]

_BACKOFF_S = 5.0
_CONNECTED_S = 60.0
_WORKER_QUICK_DEATHS = 3


@dataclass(frozen=True)
class SiteLayout:
    """Paths inside a site's state directory (see the module docstring)."""

    root: Path

    @property
    def models(self) -> Path:  # noqa: D102
        return self.root / "models"

    @property
    def audit(self) -> Path:  # noqa: D102
        return self.root / "audit"

    @property
    def node_config(self) -> Path:  # noqa: D102
        return self.root / "node-config.toml"

    @property
    def state_file(self) -> Path:  # noqa: D102
        return self.root / "site.json"

    @property
    def flwr_home(self) -> Path:  # noqa: D102
        return self.root / "flwr"

    @property
    def logs(self) -> Path:  # noqa: D102
        return self.root / "logs"

    @property
    def runtime_secret(self) -> Path:  # noqa: D102
        return self.root / "runtime.secret"

    def read_state(self) -> dict[str, Any]:
        """``site.json``, or ``{}`` before the first start."""
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}


@dataclass
class SiteOptions:
    """What ``fedinfer site`` was asked to do.

    Parameters
    ----------
    name : str
        The site's name (as registered: its node key was made for it).
    data : Path or str
        The site's data; it never leaves the site: a CSV / Parquet / NPZ file, a directory
        read lazily (class folders of PNG/NPY samples, or NPZ/Parquet shards), or
        ``py:my_pkg.data.load_site`` (allow-listed by ``$FEDINFER_DATA_TARGETS``);
        see :mod:`fedinfer.deploy.sitedata`.
    state_dir : Path
        The site's persistent state (see the module docstring).
    coordinator : str
        ``HOST:PORT`` of the coordinator's Fleet gateway.
    ca_cert, node_key, coordinator_public_key : Path
        The CA to trust, the node's private key, the coordinator's model-signing public key.
    serve : bool
        Start the inference server (default: True).
    serve_host, serve_port : str, int
        Its bind address (default: loopback, 8080; port 0 picks a free one).
    serve_args : list of str
        More ``fedinfer serve`` options (``--auth-tokens``, ``--tls-certfile`` ...).
    connect_attempts : int
        Give up after this many failed SuperNode starts in a row (default: 0, never).
    supernode_idle_poll_s : float
        How long the idle SuperNode waits before polling the coordinator again (default: 0.5;
        3 runs Flower's ``flower-supernode`` unpatched; see :mod:`fedinfer.deploy.supernode`).
    state_key : Path or None
        The site's state key file: encrypt models, ledger and audit log at rest
        (default: None, ``$FEDINFER_STATE_KEY_FILE`` if set, else plaintext).
    policy : Path or None
        The site's policy file (default: None, ``<state_dir>/site_policy.toml``); it must
        exist and parse before anything starts.
    """

    name: str
    data: Path | str
    state_dir: Path
    coordinator: str
    ca_cert: Path
    node_key: Path
    coordinator_public_key: Path
    serve: bool = True
    serve_host: str = "127.0.0.1"
    serve_port: int = 8080
    serve_args: list[str] = field(default_factory=list)
    connect_attempts: int = 0
    supernode_idle_poll_s: float = DEFAULT_IDLE_POLL_S
    state_key: Path | None = None
    policy: Path | None = None
    processes: list[ManagedProcess] = field(default_factory=list)


def serving_available() -> bool:
    """Whether this installation has the inference server (``fedinfer serve``)."""
    return importlib.util.find_spec("fedinfer.serving.server") is not None


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def node_config_toml(opts: SiteOptions) -> str:
    """Return the SuperNode's ``--node-config`` TOML: site name, data path, state, key."""
    entries = {
        NodeConfigKeys.SITE_NAME: opts.name,
        NodeConfigKeys.DATA_PATH: data_spec(opts.data),
        NodeConfigKeys.STATE_DIR: str(Path(opts.state_dir).resolve()),
        NodeConfigKeys.COORDINATOR_PUBLIC_KEY: str(Path(opts.coordinator_public_key).resolve()),
    }
    if opts.state_key is not None:
        entries[NodeConfigKeys.STATE_KEY_FILE] = str(Path(opts.state_key).resolve())
    entries[NodeConfigKeys.POLICY_FILE] = str(policy_path(opts).resolve())
    return "".join(f'"{key}" = {_toml_string(value)}\n' for key, value in entries.items())


def _check(opts: SiteOptions) -> None:
    problems = [
        f"{flag} {path} does not exist"
        for flag, path in (
            *([] if str(opts.data).startswith(DATA_FUNCTION_PREFIX) else [("--data", opts.data)]),
            ("--ca", opts.ca_cert),
            ("--key", opts.node_key),
            ("--coordinator-public-key", opts.coordinator_public_key),
        )
        if not Path(path).exists()
    ]
    if not problems and Path(opts.node_key).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        problems.append(f"--key {opts.node_key} is readable by others; `chmod 600` it")
    if not 0 < opts.supernode_idle_poll_s <= FLOWER_IDLE_SLEEP_S:
        problems.append(
            f"--supernode-idle-poll-s {opts.supernode_idle_poll_s} must be > 0 and <= "
            f"{FLOWER_IDLE_SLEEP_S} (Flower's own wait); e.g. 0.5"
        )
    if ":" not in opts.coordinator:
        problems.append(f"--coordinator {opts.coordinator!r} must be HOST:PORT")
    if opts.serve and not serving_available():
        problems.append(
            "this installation has no inference server (fedinfer.serving); pass --no-serve"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def _check_data(opts: SiteOptions) -> None:
    """Open a data directory or function now: its mistakes stop the site before it connects."""
    spec = str(opts.data)
    if spec.startswith(DATA_FUNCTION_PREFIX) or Path(spec).is_dir():
        info = inspect_site_data(spec, site_id=opts.name)
        print(f"site {opts.name}: data {info.describe()}", flush=True)


def policy_path(opts: SiteOptions) -> Path:
    """The site's policy file: ``--policy``, else ``<state-dir>/site_policy.toml``."""
    from fedinfer.policy import POLICY_FILENAME

    return Path(opts.policy) if opts.policy else Path(opts.state_dir) / POLICY_FILENAME


def check_policy(opts: SiteOptions) -> None:
    """Load the policy (a bad key is a one-line ConfigError) and check the pinned coordinator key.

    Raises
    ------
    ConfigError
        The policy is missing or invalid, or pins another coordinator key than the one given.
    """
    from fedinfer.artifacts import key_fingerprint, load_public_key
    from fedinfer.policy import load_policy

    policy = load_policy(policy_path(opts))
    pinned = policy.coordinator_key_fingerprint
    if pinned is not None:
        actual = key_fingerprint(load_public_key(Path(opts.coordinator_public_key)))
        if actual != pinned.lower():
            raise ConfigError(
                f"site policy `coordinator_key_fingerprint` pins {pinned}, but "
                f"--coordinator-public-key {opts.coordinator_public_key} is {actual}"
            )


def run_site(opts: SiteOptions) -> int:
    """Start the SuperNode and the inference server; supervise until SIGTERM or a child fails.

    Returns 0 after SIGTERM/SIGINT, 2 when a child exited on its own (its log says why:
    an untrusted certificate, an unregistered key ...).
    """
    _check(opts)
    _check_data(opts)
    layout = SiteLayout(Path(opts.state_dir).resolve())
    key = _state_key(opts, layout)
    check_policy(opts)
    for directory in (layout.root, layout.models, layout.audit, layout.logs):
        directory.mkdir(parents=True, exist_ok=True)
    os.chmod(layout.root, 0o700)
    if key is not None:
        mark_state_dir(layout.root, key)
    layout.node_config.write_text(node_config_toml(opts))
    with signals_raise_shutdown():
        try:
            runtime_api = _start_supernode(opts, layout)
            _start_worker(opts, layout, runtime_api)
            if opts.serve:
                _start_server(opts, layout)
            _write_state(opts, layout)
            return _supervise(opts)
        except Shutdown as sig:
            print(f"site {opts.name}: {sig} received, shutting down", flush=True)
            return 0
        except FedInferError as exc:
            print(f"site {opts.name}: {exc}", file=sys.stderr, flush=True)
            return 2
        finally:
            for proc in reversed(opts.processes):
                proc.stop()


def _state_key(opts: SiteOptions, layout: SiteLayout) -> StateKey | None:
    """Load ``--state-key`` and check it fits the state directory (before starting anything)."""
    key = resolve_state_key(opts.state_key, protects=[layout.root])
    check_state_dir(layout.root, key)
    if key is None:
        return None
    opts.state_key = key.path  # the ClientApp and the server get this path, never the key
    plaintext = [str(p) for p in _plaintext_state(layout)]
    if plaintext:
        raise StateKeyError(
            f"--state-key given, but {', '.join(plaintext)} is plaintext; encrypt the state "
            f"first: `fedinfer keys encrypt-state {layout.root} --state-key {key.path}`"
        )
    return key


def _plaintext_state(layout: SiteLayout) -> list[Path]:
    """The parts of a state directory written in plaintext (before encryption was turned on)."""
    secagg = layout.root / "secagg"
    candidates = [
        layout.root / "ledger.json",
        layout.models / "CURRENT",
        secagg / "identity.key",
        *sorted(secagg.glob("run-*.json")),
    ]
    found = [p for p in candidates if p.is_file() and not is_sealed(p.read_bytes())]
    active_audit = layout.audit / "audit.jsonl"
    if active_audit.is_file() and active_audit.read_bytes()[:1] == b"{":
        found.append(active_audit)
    return found


def _start_worker(opts: SiteOptions, layout: SiteLayout, runtime_api: str) -> None:
    """Start the site worker: it claims the SuperNode's tasks and runs the site's ClientApp."""
    argv = [
        sys.executable,
        "-m",
        "fedinfer.deploy.site_worker",
        "--node-config",
        str(layout.node_config),
        "--runtime-api",
        runtime_api,
        "--secret-file",
        str(layout.runtime_secret),
    ]
    # The state key's path in the environment: whatever opens by state directory alone
    # (the privacy ledger) finds it there.
    env = dict(os.environ, **({KEY_ENV_VAR: str(opts.state_key)} if opts.state_key else {}))
    worker = ManagedProcess("worker", argv, log_file=layout.logs / "worker.log", env=env)
    opts.processes.append(worker.start())


def _start_supernode(opts: SiteOptions, layout: SiteLayout) -> str:
    """Start the SuperNode (no app code runs in it); returns its Runtime API address."""
    write_runtime_secret(layout.runtime_secret)
    runtime_port = free_port()
    argv = supernode_argv(
        superlink=opts.coordinator,
        ca_cert=Path(opts.ca_cert).resolve(),
        node_key=Path(opts.node_key).resolve(),
        node_config=layout.node_config,
        runtime_port=runtime_port,
        runtime_secret=layout.runtime_secret,
        idle_poll_s=(
            None
            if opts.supernode_idle_poll_s == FLOWER_IDLE_SLEEP_S
            else opts.supernode_idle_poll_s
        ),
    )
    env = flower_env(layout.flwr_home)
    supernode = ManagedProcess("supernode", argv, log_file=layout.logs / "supernode.log", env=env)
    opts.processes.append(supernode.start())
    return f"127.0.0.1:{runtime_port}"


def _start_server(opts: SiteOptions, layout: SiteLayout) -> None:
    port_file = layout.root / "serve.port"
    port_file.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "fedinfer",
        "serve",
        "--model-store",
        str(layout.models),
        "--host",
        opts.serve_host,
        "--port",
        str(opts.serve_port),
        "--port-file",
        str(port_file),
        "--public-key",
        str(Path(opts.coordinator_public_key).resolve()),
        "--audit-dir",
        str(layout.audit),
        *(["--state-key", str(opts.state_key)] if opts.state_key else []),
        *opts.serve_args,
    ]
    server = ManagedProcess("serve", argv, log_file=layout.logs / "serve.log").start()
    opts.processes.append(server)
    wait_until(
        lambda: _read_port(port_file) is not None,
        timeout_s=120,
        interval_s=0.1,
        what=f"the inference server to bind (see {server.log_file})",
        alive=server.check_alive,
    )
    print(
        f"site {opts.name}: inference server on {opts.serve_host}:{_read_port(port_file)}",
        flush=True,
    )


def _read_port(port_file: Path) -> int | None:
    try:
        text = port_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _write_state(opts: SiteOptions, layout: SiteLayout) -> None:
    tls = any(arg.startswith("--tls-certfile") for arg in opts.serve_args)
    serve = {"host": opts.serve_host, "port": _read_port(layout.root / "serve.port"), "tls": tls}
    write_json_atomic(
        layout.state_file,
        {
            "name": opts.name,
            "pid": os.getpid(),
            "coordinator": opts.coordinator,
            "started": time.time(),
            "pids": {p.name: p.pid for p in opts.processes},
            "serve": serve,
            "state_key": str(opts.state_key) if opts.state_key else None,
        },
    )


def _supervise(opts: SiteOptions) -> int:
    """Watch both children; restart a SuperNode that could not connect, with backoff.

    A SuperNode exits when the SuperLink is unreachable or refuses it (coordinator
    not up yet, key not yet registered, untrusted certificate); the site keeps
    trying, every attempt's reason in its output, up to ``connect_attempts`` (0: forever).
    A SuperNode that stayed up for a while was connected: its attempts count afresh.
    A site worker that dies is restarted at once (its state is on disk; messages wait for
    it in the SuperNode); when it dies again within ``_CONNECTED_S`` of a start, after 2 s,
    then 4 s; the next such death (``_WORKER_QUICK_DEATHS`` restarts used up) ends the site.
    """
    print(f"site {opts.name}: SuperNode connecting to {opts.coordinator}", flush=True)
    attempts, started = 1, time.monotonic()
    worker_started, worker_deaths = time.monotonic(), 0
    while True:
        time.sleep(1.0)
        for proc in opts.processes:
            code = proc.poll()
            if code is None:
                continue
            print(
                f"site {opts.name}: {proc.name} exited with code {code}: {_reason(proc)} "
                f"(log: {proc.log_file})",
                file=sys.stderr,
                flush=True,
            )
            if proc.name == "worker":
                ran_for = time.monotonic() - worker_started
                worker_deaths = 1 if ran_for > _CONNECTED_S else worker_deaths + 1
                if worker_deaths > _WORKER_QUICK_DEATHS:
                    return 2
                delay = 2.0 ** (worker_deaths - 1) if worker_deaths > 1 else 0.0
                print(
                    f"site {opts.name}: restarting the site worker"
                    + (f" in {delay:.0f}s" if delay else ""),
                    flush=True,
                )
                time.sleep(delay)
                proc.start()
                worker_started = time.monotonic()
                _write_state(opts, SiteLayout(Path(opts.state_dir).resolve()))  # its new pid
                continue
            if proc.name != "supernode":
                return 2
            attempts = 1 if time.monotonic() - started > _CONNECTED_S else attempts + 1
            if opts.connect_attempts and attempts > opts.connect_attempts:
                return 2
            delay = min(_BACKOFF_S * 2 ** min(attempts - 2, 4), 60.0)
            print(
                f"site {opts.name}: reconnecting in {delay:.0f}s (attempt {attempts})", flush=True
            )
            time.sleep(delay)
            proc.start()
            started = time.monotonic()


def _reason(proc: ManagedProcess) -> str:
    """Return the line of a Flower log that says why it gave up, else its last lines."""
    try:
        lines = proc.log_file.read_text(errors="replace").splitlines()[-40:]
    except OSError:
        return ""
    for marker in ("CERTIFICATE_VERIFY_FAILED", "Failed to activate", "[code:"):
        found = [line.strip() for line in lines if marker in line]
        if found:
            return found[-1]
    return proc.tail(3)
