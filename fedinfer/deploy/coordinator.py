"""``fedinfer coordinator``: the SuperLink, the Fleet gateway and one federation, supervised.

Processes (each with a log under ``<workdir>/logs/``)::

    fedinfer coordinator            this supervisor; Ctrl-C / SIGTERM stops everything
    ├── flower-superlink            127.0.0.1:<link-port> only: Fleet + Control + Runtime APIs (TLS)
    │   └── flower-superexec        (own session, exits with the SuperLink)
    │       └── flwr-serverapp      runs server/app.py -> fedinfer.fl.coordinator.run_coordinator
    └── gateway                     <host>:<port>: forwards the Fleet API only (see gateway.py)

Working directory::

    <workdir>/
      coordinator.json   what `fedinfer status` reads: addresses, pids, Flower run id, sites
      serverapp.json     coordinator-only settings for the ServerApp process
      superlink.db       Flower's state: registered node keys survive a restart
      flwr/              FLWR_HOME of the SuperLink and of the `flwr` CLI
      app/               the generated Flower app (pyproject.toml with the run config)
      output/            results.json, checkpoint/, model/ (the signed final artifact)
      logs/              superlink.log, gateway.log, serverapp.log, rounds.log
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import ssl
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fedinfer.config.schema import FedInferConfig
from fedinfer.config.validate import validate_config
from fedinfer.reporting.text import plural
from fedinfer.privacy.noise import refuse_reproducible_noise
from fedinfer.deploy.apps import COORDINATOR_DIR_ENV, CoordinatorRuntime, model_shape
from fedinfer.deploy.bundle import write_app_bundle
from fedinfer.deploy.certs import Pki
from fedinfer.deploy.flower import FlowerCli, flower_env, superlink_argv
from fedinfer.deploy.process import (
    ManagedProcess,
    Shutdown,
    free_port,
    signals_raise_shutdown,
    wait_until,
)
from fedinfer.errors import ConfigError, FedInferError
from fedinfer.fl.checkpoint import checkpoint_path
from fedinfer.reporting.results import RESULTS_FILE, write_json_atomic

__all__ = ["CoordinatorLayout", "CoordinatorOptions", "run_coordinator_service"]

logger = logging.getLogger(__name__)

_FINISHED = "finished"


@dataclass(frozen=True)
class CoordinatorLayout:
    """Paths inside a coordinator's working directory (see the module docstring)."""

    root: Path

    @property
    def state_file(self) -> Path:  # noqa: D102
        return self.root / "coordinator.json"

    @property
    def flwr_home(self) -> Path:  # noqa: D102
        return self.root / "flwr"

    @property
    def database(self) -> Path:  # noqa: D102
        return self.root / "superlink.db"

    @property
    def app_dir(self) -> Path:  # noqa: D102
        return self.root / "app"

    @property
    def output_dir(self) -> Path:  # noqa: D102
        return self.root / "output"

    @property
    def logs(self) -> Path:  # noqa: D102
        return self.root / "logs"

    def read_state(self) -> dict[str, Any]:
        """``coordinator.json``, or ``{}`` before the first start."""
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}


@dataclass
class CoordinatorOptions:
    """What ``fedinfer coordinator`` was asked to do.

    Parameters
    ----------
    cfg : FedInferConfig
        The federation (same Hydra config as a simulation, plus ``deployment.*``).
    pki_dir : Path
        A ``fedinfer certs init`` directory; every site in it is registered.
    workdir : Path
        The coordinator's working directory.
    host, port : str, int
        Where sites reach the Fleet gateway (default: ``0.0.0.0:9092``).
    link_port : int
        Loopback port of the SuperLink itself (0: a free one).
    resume : bool
        Continue the federation from ``workdir``'s last checkpoint.
    keep_alive : bool
        Keep serving after the federation ends, until SIGTERM.
    """

    cfg: FedInferConfig
    pki_dir: Path
    workdir: Path
    host: str = "0.0.0.0"  # noqa: S104 - the gateway is the public face; see gateway.py
    port: int = 9092
    link_port: int = 0
    resume: bool = False
    keep_alive: bool = False
    processes: list[ManagedProcess] = field(default_factory=list)


def _check_start(opts: CoordinatorOptions, layout: CoordinatorLayout, pki: Pki) -> None:
    validate_config(opts.cfg)
    refuse_reproducible_noise(opts.cfg.privacy.reproducible_noise, where="`fedinfer coordinator`")
    model_shape(opts.cfg)
    if not pki.server_cert.exists():
        raise ConfigError(
            f"{opts.pki_dir} is not a `fedinfer certs init` directory (no {pki.server_cert})"
        )
    if not pki.sites():
        raise ConfigError(
            f"{opts.pki_dir} has no sites; add them with `fedinfer certs add-site NAME`"
        )
    if checkpoint_path(layout.output_dir).exists() and not opts.resume:
        raise ConfigError(
            f"{layout.output_dir} holds a checkpoint of an earlier federation: pass --resume "
            "to continue it, or give a fresh --workdir"
        )


def run_coordinator_service(opts: CoordinatorOptions) -> int:
    """Start SuperLink and gateway, register the sites, run the federation, stop cleanly.

    Returns 0 when the federation completed (and, with ``keep_alive``, after SIGTERM),
    1 when it failed or stopped early, 143 when interrupted by a signal.
    """
    layout, pki = CoordinatorLayout(Path(opts.workdir).resolve()), Pki(Path(opts.pki_dir).resolve())
    _check_start(opts, layout, pki)
    layout.logs.mkdir(parents=True, exist_ok=True)
    with signals_raise_shutdown():
        try:
            restarted = layout.database.exists()
            cli = _start_link(opts, layout, pki)
            nodes = _register_sites(cli, pki, known=layout.read_state().get("sites", {}))
            if restarted:
                _stop_stale_runs(cli)
            run_id = _launch(opts, layout, pki, cli, nodes)
            status = _follow(opts, layout, cli, run_id)
            outcome = status.removeprefix(f"{_FINISHED}:")  # Flower's "finished:completed"
            results = layout.output_dir / RESULTS_FILE
            if status != f"{_FINISHED}:completed":
                _explain_failure(cli, run_id, layout)
            where = f"results in {results}" if results.exists() else "no results were written"
            print(f"federation {outcome}; {where}", flush=True)
            if opts.keep_alive:
                print("keeping the SuperLink up for the sites (Ctrl-C to stop)", flush=True)
                _idle(opts)
            return 0 if status == "finished:completed" else 1
        except Shutdown as sig:
            print(f"coordinator: {sig} received, shutting down", flush=True)
            return 143
        finally:
            _stop_all(opts, layout)


def _start_link(opts: CoordinatorOptions, layout: CoordinatorLayout, pki: Pki) -> FlowerCli:
    """Start the SuperLink (loopback) and the gateway (public); wait until both answer."""
    link_port = opts.link_port or free_port()
    env = flower_env(layout.flwr_home, {COORDINATOR_DIR_ENV: str(layout.root)})
    argv = superlink_argv(
        ca_cert=pki.ca_cert,
        cert=pki.server_cert,
        key=pki.server_key,
        host="127.0.0.1",
        port=link_port,
        database=layout.database,
    )
    link = ManagedProcess("superlink", argv, log_file=layout.logs / "superlink.log", env=env)
    opts.processes.append(link.start())
    gateway = ManagedProcess(
        "gateway",
        _gateway_argv(opts, pki, link_port),
        log_file=layout.logs / "gateway.log",
        env=env,
    )
    opts.processes.append(gateway.start())
    probe = "127.0.0.1" if opts.host in ("0.0.0.0", "::") else opts.host  # noqa: S104
    _wait_healthy(link, f"https://127.0.0.1:{link_port}/health", pki.ca_cert)
    _wait_healthy(gateway, f"https://{_hostport(probe, opts.port)}/health", pki.ca_cert)
    cli = FlowerCli(layout.flwr_home, f"127.0.0.1:{link_port}", pki.ca_cert)
    cli.write_config()
    _write_state(
        layout,
        {
            "pid": os.getpid(),
            "superlink": f"127.0.0.1:{link_port}",
            "fleet": _hostport(opts.host, opts.port),
            "status": "starting",
            "pids": {p.name: p.pid for p in opts.processes},
            "ca_cert": str(pki.ca_cert),
        },
    )
    print(
        f"SuperLink up (loopback :{link_port}); sites connect to {_hostport(opts.host, opts.port)}",
        flush=True,
    )
    return cli


def _gateway_argv(opts: CoordinatorOptions, pki: Pki, link_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedinfer.deploy.gateway",
        "--host",
        opts.host,
        "--port",
        str(opts.port),
        "--upstream",
        f"https://127.0.0.1:{link_port}",
        "--ca-cert",
        str(pki.ca_cert),
        "--certfile",
        str(pki.server_cert),
        "--keyfile",
        str(pki.server_key),
    ]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wait_healthy(proc: ManagedProcess, url: str, ca_cert: Path) -> None:
    def healthy() -> bool:
        try:
            with httpx.Client(
                verify=ssl.create_default_context(cafile=str(ca_cert)), timeout=2.0, trust_env=False
            ) as client:
                return client.get(url).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(
        healthy, timeout_s=120, what=f"{proc.name} at {url}", interval_s=0.5, alive=proc.check_alive
    )


def _register_sites(
    cli: FlowerCli, pki: Pki, *, known: dict[str, int | None]
) -> dict[str, int | None]:
    """Register every site's node key; a key the SuperLink's database already holds is fine.

    ``known`` maps sites to the node ids an earlier start recorded in ``coordinator.json``.
    """
    nodes: dict[str, int | None] = {}
    for name in pki.sites():
        try:
            nodes[name] = cli.register_node(pki.node_pub(name), name=name)
        except FedInferError as exc:
            if "already" not in str(exc).lower():
                raise
            nodes[name] = known.get(name)  # registered by an earlier start; superlink.db kept it
    return nodes


def _stop_stale_runs(cli: FlowerCli) -> None:
    """Stop runs a crashed coordinator left behind; their messages would stay queued at sites."""
    for run in cli.list_runs():
        if not str(run.get("status", "")).startswith(_FINISHED):
            logger.info("stopping run %s left by an earlier start", run["run-id"])
            with contextlib.suppress(FedInferError):
                cli.stop_run(int(run["run-id"]))


def _launch(
    opts: CoordinatorOptions,
    layout: CoordinatorLayout,
    pki: Pki,
    cli: FlowerCli,
    nodes: dict[str, int | None],
) -> int:
    """Leave the ServerApp its settings, write the app with the run config, ``flwr run`` it."""
    cfg = opts.cfg
    cfg.output_dir = str(layout.output_dir)
    layout.output_dir.mkdir(parents=True, exist_ok=True)
    CoordinatorRuntime(
        output_dir=str(layout.output_dir),
        signing_key=str(pki.signing_key),
        run_id=uuid.uuid4().hex[:12],
        resume=opts.resume,
        rounds_log=str(layout.logs / "rounds.log"),
        coordinator_pid=os.getpid(),
    ).save(layout.root)
    write_app_bundle(layout.app_dir, cfg)
    run_id = cli.run(layout.app_dir)
    _update_state(
        layout,
        status="running",
        flower_run_id=run_id,
        sites=nodes,
        started=time.time(),
        resume=opts.resume,
        rounds=cfg.federation.rounds,
    )
    resumed = " (resumed)" if opts.resume else ""
    print(
        f"federation started: Flower run {run_id}, {plural(cfg.federation.rounds, 'round')}, "
        f"{plural(len(nodes), 'registered site')}{resumed}",
        flush=True,
    )
    return run_id


def _follow(
    opts: CoordinatorOptions, layout: CoordinatorLayout, cli: FlowerCli, run_id: int
) -> str:
    """Echo rounds as they complete; return Flower's final status of the run."""
    rounds_log = layout.logs / "rounds.log"
    offset = rounds_log.stat().st_size if rounds_log.exists() else 0
    launched, last_check = time.time(), time.monotonic()
    while True:
        for proc in opts.processes:
            proc.check_alive()
        offset = _echo_new_lines(rounds_log, offset)
        # Each `flwr ls` costs a Python start-up: ask every 10 s, or soon once the ServerApp is done
        waited = time.monotonic() - last_check
        if waited > 10 or (waited > 2 and _results_final(layout, since=launched)):
            last_check = time.monotonic()
            status = next(
                (str(r["status"]) for r in cli.list_runs() if int(r["run-id"]) == run_id), "unknown"
            )
            if status.startswith(_FINISHED):
                _echo_new_lines(rounds_log, offset)
                _update_state(layout, status=status, finished=time.time())
                return status
        time.sleep(1.0)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def serverapp_exception(log_text: str) -> str | None:
    """The exception line of the last traceback in a ServerApp's log (``Type: message``)."""
    lines = _ANSI.sub("", log_text).splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call")]
    if not starts:
        return None
    for line in lines[starts[-1] + 1 :]:
        if line and not line[0].isspace():
            return line.strip()
    return None


def _explain_failure(cli: FlowerCli, run_id: int, layout: CoordinatorLayout) -> None:
    """Print why the ServerApp failed and keep its whole log in ``logs/serverapp.log``."""
    log_text = cli.run_log(run_id)
    if not log_text:
        print(f"the ServerApp's log is not available (`flwr log {run_id}`)", flush=True)
        return
    path = layout.logs / "serverapp.log"
    path.write_text(_ANSI.sub("", log_text))
    reason = serverapp_exception(log_text)
    if reason:
        kind, _, message = reason.partition(": ")
        ours = kind.startswith("fedinfer.") and message  # our errors are written for the user
        print(f"the ServerApp stopped: {message if ours else reason}", flush=True)
    print(f"the ServerApp's log: {path}", flush=True)


def _results_final(layout: CoordinatorLayout, *, since: float) -> bool:
    path = layout.output_dir / RESULTS_FILE
    try:
        fresh = path.stat().st_mtime >= since
        return fresh and json.loads(path.read_text()).get("status") in ("completed", "stopped")
    except (OSError, ValueError):
        return False


def _echo_new_lines(path: Path, offset: int) -> int:
    if not path.exists():
        return offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    if chunk:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(chunk)


def _idle(opts: CoordinatorOptions) -> None:
    while True:
        for proc in opts.processes:
            proc.check_alive()
        time.sleep(1.0)


def _stop_all(opts: CoordinatorOptions, layout: CoordinatorLayout) -> None:
    for proc in reversed(opts.processes):
        proc.stop()
    opts.processes.clear()
    with contextlib.suppress(Exception):
        _update_state(layout, pids={}, stopped=time.time())


def _write_state(layout: CoordinatorLayout, state: dict[str, Any]) -> None:
    previous = layout.read_state()
    previous.update(state)
    write_json_atomic(layout.state_file, previous)


def _update_state(layout: CoordinatorLayout, **fields: Any) -> None:
    _write_state(layout, fields)
