"""Flower's deployment runtime, driven through its own commands.

``flower-superlink``, ``flower-supernode`` and the ``flwr`` CLI are Flower's
public interface, so we build their command lines here and parse the CLI's
``--format json`` output, rather than importing Flower internals.

Facts of Flower 1.42 this module relies on (read from its source):

- the SuperLink serves the Fleet, Control and Runtime APIs over HTTPS on one
  ``--host``/``--port``; ``--enable-supernode-auth`` needs TLS and refuses any
  SuperNode whose public key was not registered through the Control API
  (``flwr supernode register``), so the Control API must stay on loopback;
- a SuperNode authenticates with ``--auth-supernode-private-key`` (EC key in
  OpenSSH format) and trusts ``--root-certificates``; ``--node-config`` takes a
  TOML file; by default it runs every message's ClientApp in a fresh subprocess (a
  ``flower-superexec`` child installs the app bundle and imports its ClientApp); with
  ``--isolation process`` it starts neither and leaves each message as a task on its
  Runtime API, claimable only with ``--superexec-auth-secret-file``'s secret (how sites run);
- without ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` each app process
  would try to install the app's dependencies (network); we always disable it;
- ``FLWR_HOME`` holds the CLI's ``config.toml`` and the unpacked app bundles.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedinfer.errors import FedInferError

__all__ = ["FlowerCli", "flower_bin", "flower_env", "superlink_argv", "supernode_argv"]

CONNECTION = "fedinfer"


def flower_bin(name: str) -> str:
    """Path of a Flower executable: next to this Python first (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FedInferError(
            f"`{name}` not found; install Flower (`pip install 'flwr[simulation]==1.42.0'`)"
        )
    return found


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return a Flower process's environment: its own FLWR_HOME, no installs, no phoning home."""
    env = dict(os.environ)
    # Flower's SuperLink spawns `flower-superexec` by name: make this venv's
    # scripts findable even when the venv is not activated (CI, cron, systemd units).
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")]) if env.get("PATH") else scripts
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def superlink_argv(
    *, ca_cert: Path, cert: Path, key: Path, host: str, port: int, database: Path
) -> list[str]:
    """``flower-superlink`` with TLS and node authentication on ``host:port``."""
    return [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(ca_cert),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database),
        "--disable-runtime-dependency-installation",
    ]


def supernode_argv(
    *,
    superlink: str,
    ca_cert: Path,
    node_key: Path,
    node_config: Path,
    runtime_port: int,
    runtime_secret: Path,
    idle_poll_s: float | None = None,
) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` over TLS with node authentication.

    ``--isolation process``: the SuperNode starts no ClientApp process; its Runtime API
    (loopback, ``runtime_port``) holds each message as a task for the site worker, which alone
    can claim it: claims are signed with the secret in ``runtime_secret``. With ``idle_poll_s``
    Flower's SuperNode runs through :mod:`fedinfer.deploy.supernode`, which shortens its 3 s
    sleep after an empty poll of the SuperLink.
    """
    launcher = (
        [flower_bin("flower-supernode")]
        if idle_poll_s is None
        else [sys.executable, "-m", "fedinfer.deploy.supernode", "--idle-poll-s", str(idle_poll_s)]
        + ["--"]
    )
    return [
        *launcher,
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(runtime_secret),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca_cert),
        "--auth-supernode-private-key",
        str(node_key),
        "--node-config",
        str(node_config),
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]


@dataclass(frozen=True)
class FlowerCli:
    """The ``flwr`` CLI talking to one SuperLink's Control API.

    Parameters
    ----------
    flwr_home : Path
        The CLI's FLWR_HOME; :meth:`write_config` puts the connection there.
    address : str
        ``host:port`` of the Control API (loopback).
    root_certificates : Path
        The CA that signed the SuperLink's certificate.
    """

    flwr_home: Path
    address: str
    root_certificates: Path

    def write_config(self) -> Path:
        """Write ``config.toml`` with a default connection named ``fedinfer``."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\n'
            f'root-certificates = "{self.root_certificates.resolve()}"\n'
        )
        return path

    def _flwr(self, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS...`` with this CLI's FLWR_HOME; raise if it does not answer in time."""
        try:
            return subprocess.run(
                [flower_bin("flwr"), *args],
                capture_output=True,
                text=True,
                timeout=timeout_s,  # noqa: S603
                env=flower_env(self.flwr_home),
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise FedInferError(
                f"`flwr {' '.join(args)}` did not answer within {timeout_s:.0f}s"
            ) from None

    def call(self, *args: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGS... --format json`` and return its JSON; raise on failure."""
        done = self._flwr(*args, "--format", "json", timeout_s=timeout_s)
        payload = _last_json(done.stdout)
        if done.returncode != 0 or not payload.get("success", False):
            reason = (
                payload.get("error-message")
                or done.stderr.strip()[-500:]
                or done.stdout.strip()[-500:]
            )
            raise FedInferError(f"`flwr {' '.join(args)}` failed: {reason}")
        return payload

    def register_node(self, public_key: Path, *, name: str) -> int:
        """Register a site's node public key; returns the node id Flower gives it."""
        return int(
            self.call("supernode", "register", str(public_key), CONNECTION, "--name", name)[
                "node-id"
            ]
        )

    def list_nodes(self) -> list[dict[str, Any]]:
        """Every registered node with its status (``registered``, ``online``, ``offline``)."""
        return list(self.call("supernode", "list", CONNECTION)["nodes"])

    def run(self, app_dir: Path) -> int:
        """``flwr run APP``: start the app on the SuperLink; returns Flower's run id."""
        return int(self.call("run", str(app_dir), CONNECTION, timeout_s=300)["run-id"])

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run the SuperLink knows, with status (``running``, ``finished:completed`` ...)."""
        return list(self.call("ls", CONNECTION)["runs"])

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (its ServerApp is told to exit)."""
        self.call("stop", str(run_id), CONNECTION)

    def run_log(self, run_id: int, *, timeout_s: float = 60.0) -> str:
        """``flwr log RUN --show``: what the run's ServerApp printed ("" when unavailable)."""
        try:
            done = self._flwr("log", str(run_id), CONNECTION, "--show", timeout_s=timeout_s)
        except FedInferError:
            return ""
        return done.stdout if done.returncode == 0 else ""


def _last_json(stdout: str) -> dict[str, Any]:
    """Return the JSON object the CLI prints last (it may print other lines before it)."""
    start = stdout.find("{")
    while start != -1:
        try:
            value = json.loads(stdout[start:])
            return value if isinstance(value, dict) else {}
        except json.JSONDecodeError:
            start = stdout.find("{", start + 1)
    return {}
