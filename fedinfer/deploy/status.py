"""``fedinfer status``: processes, connected sites, rounds, and (on one machine) the site servers.

Everything is read from the working directories (``coordinator.json``,
``results.json``, ``site.json``, ledgers, model stores) plus two live probes:
the SuperLink's node list through the ``flwr`` CLI, and each local site
server's ``/v2/health/ready``. Nothing here changes any state.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import httpx

from fedinfer.crypto.at_rest import StateKey
from fedinfer.deploy.coordinator import CoordinatorLayout
from fedinfer.deploy.flower import FlowerCli
from fedinfer.deploy.site import SiteLayout
from fedinfer.errors import FedInferError
from fedinfer.reporting.results import RESULTS_FILE

__all__ = ["collect_status", "render_status"]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _coordinator_dir(workdir: Path) -> Path | None:
    for candidate in (workdir, workdir / "coordinator"):
        if (candidate / "coordinator.json").exists():
            return candidate
    return None


def collect_status(workdir: Path) -> dict[str, Any]:
    """Collect the status of a coordinator ``--workdir`` or a ``deploy local`` directory."""
    workdir = Path(workdir).resolve()
    coordinator = _coordinator_dir(workdir)
    sites_root = workdir / "sites"
    if coordinator is None and not sites_root.is_dir():
        raise FedInferError(
            f"{workdir} is neither a coordinator --workdir nor a `deploy local` directory"
        )
    return {
        "coordinator": _coordinator_status(CoordinatorLayout(coordinator)) if coordinator else None,
        "sites": [
            _site_status(SiteLayout(d))
            for d in sorted(sites_root.iterdir())
            if (d / "site.json").exists()
        ]
        if sites_root.is_dir()
        else [],
    }


def _coordinator_status(layout: CoordinatorLayout) -> dict[str, Any]:
    state = layout.read_state()
    results_file = layout.output_dir / RESULTS_FILE
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    rounds = results.get("rounds", [])
    status: dict[str, Any] = {
        "workdir": str(layout.root),
        "running": _alive(state.get("pid")),
        "processes": {name: _alive(pid) for name, pid in state.get("pids", {}).items()},
        "fleet": state.get("fleet"),
        "flower_run": state.get("flower_run_id"),
        "run_status": state.get("status"),
        "rounds_done": len(rounds),
        "rounds_planned": state.get("rounds"),
        "last_round": {
            k: rounds[-1].get(k) for k in ("round", "federated", "epsilon", "duration_s")
        }
        if rounds
        else None,
        "model_version": results.get("model_version"),
        "deployed": results.get("deployed"),
        "nodes": None,
    }
    if status["processes"].get("superlink") and state.get("ca_cert"):
        with contextlib.suppress(FedInferError):
            names = {int(v): k for k, v in state.get("sites", {}).items() if v is not None}
            cli = FlowerCli(layout.flwr_home, state["superlink"], Path(state["ca_cert"]))
            status["nodes"] = [
                {
                    "site": names.get(int(n["node-id"]), "?"),
                    "node_id": n["node-id"],
                    "status": n["status"],
                }
                for n in cli.list_nodes()
            ]
    return status


def _site_status(layout: SiteLayout) -> dict[str, Any]:
    state = layout.read_state()
    serve = state.get("serve", {})
    status: dict[str, Any] = {
        "site": state.get("name", layout.root.name),
        "running": _alive(state.get("pid")),
        "processes": {name: _alive(pid) for name, pid in state.get("pids", {}).items()},
        "model_version": _current_version(layout),
        "epsilon": _epsilon(layout),
        "server": None,
    }
    if serve.get("port") and status["processes"].get("serve"):
        scheme = "https" if serve.get("tls") else "http"
        url = f"{scheme}://{serve['host']}:{serve['port']}"
        status["server"] = {"url": url, "ready": _ready(url)}
    return status


def _state_key(layout: SiteLayout) -> StateKey | None:
    """The key ``fedinfer site`` recorded (its path) in site.json, if this user may read it."""
    path = layout.read_state().get("state_key")
    return StateKey.load(Path(path)) if path else None


def _current_version(layout: SiteLayout) -> int | None:
    from fedinfer.artifacts import ModelStore

    with contextlib.suppress(Exception):
        return ModelStore(layout.models, key=_state_key(layout)).current_version()
    return None


def _epsilon(layout: SiteLayout) -> float | None:
    from fedinfer.privacy import PrivacyLedger

    with contextlib.suppress(Exception):
        return float(PrivacyLedger.read(layout.root, key=_state_key(layout)).epsilon)
    return None


def _ready(url: str) -> bool:
    try:
        # verify=False: a liveness probe of a local server whose certificate the site chose
        with httpx.Client(timeout=2.0, verify=False, trust_env=False) as client:  # noqa: S501
            return client.get(f"{url}/v2/health/ready").status_code == 200
    except httpx.HTTPError:
        return False


def render_status(status: dict[str, Any]) -> str:
    """Human-readable lines of :func:`collect_status`'s result."""
    lines = []
    coord = status.get("coordinator")
    if coord:
        procs = (
            ", ".join(f"{k} {'up' if v else 'down'}" for k, v in coord["processes"].items())
            or "not running"
        )
        lines.append(f"coordinator  {coord['workdir']}  [{procs}]  fleet {coord['fleet']}")
        lines.append(
            f"  run {coord['flower_run']}: {str(coord['run_status']).removeprefix('finished:')}, "
            f"rounds {coord['rounds_done']}/"
            f"{coord['rounds_planned']}, model version {coord['model_version']}, "
            f"deployed {coord['deployed']}"
        )
        for node in coord.get("nodes") or []:
            lines.append(f"  node {node['site']:<12} {node['status']:<10} id {node['node_id']}")
    for site in status.get("sites", []):
        server = site["server"]
        serving = (
            f"{server['url']} {'ready' if server['ready'] else 'not ready'}"
            if server
            else "no server"
        )
        eps = f"{site['epsilon']:.3f}" if site["epsilon"] is not None else "-"
        lines.append(
            f"site {site['site']:<12} {'up' if site['running'] else 'down':<5} "
            f"model v{site['model_version']}  "
            f"epsilon {eps}  {serving}"
        )
    return "\n".join(lines) or "nothing found"
