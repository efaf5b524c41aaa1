"""Round latency: one federation as a simulation and as a real deployment; where the time goes.

The same config on three runtimes:

- ``inprocess``: the simulation's sequential in-process grid (ClientApp objects called directly);
- ``ray``: Flower's simulation runtime (the default of ``fedinfer simulate``);
- ``deployment``: ``fedinfer deploy local`` (SuperLink + gateway + one SuperNode and one
  inference server per site, TLS and node authentication, every message a new ClientApp process).

Per round it reports the coordinator's ``duration_s`` from ``results.json``. The breakdown of
a steady-state deployment round (rounds 2..R; round 1 also pays warm-ups) adds parts measured
separately: the ClientApp process cold start (a fresh ``python`` importing Flower's ClientApp
runner and ours), the sites' own training time (``train-time-s`` each site reports), and Flower's
polling (SuperNodes poll the SuperLink every 3 s, the ServerApp polls for replies every 3 s, so
each exchange waits 1.5 s + 1.5 s on average). On one machine all sites' ClientApps share its
cores, so the same parts are also added up as CPU seconds over the core count.

    python bench/deployment_latency.py               # secagg off and on -> results/deployment.md
    python bench/deployment_latency.py --report-only # re-render from results/deployment.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedinfer.config import load_config
from fedinfer.deploy.local import LocalDeployment
from fedinfer.simulation import run_simulation

CLIENTAPP_IMPORT = (
    "import flwr.supernode.cli.flwr_clientapp\n"
    "from fedinfer.deploy.apps import build_deploy_client_app\n"
    "build_deploy_client_app()"
)
FIRST_CALLS = """
import json, tempfile, time
from pathlib import Path
import torch
from fedinfer.config import load_config
from fedinfer.data import build_federated_data
from fedinfer.fl.site import SiteEnv, local_train
from fedinfer.models import build_model
from fedinfer.training import get_weights
cfg = load_config(["dataset.num_samples=2000", "federation.num_sites=3",
                   "federation.local_epochs=1"])
site = build_federated_data(cfg).sites[0]
torch.manual_seed(0)
model = build_model(cfg.model, input_dim=site.input_dim, num_classes=site.num_classes)
weights = get_weights(model)
times = []
with tempfile.TemporaryDirectory() as state:
    env = SiteEnv("site-00", Path(state), site, None)
    for server_round in (1, 2, 3):
        started = time.perf_counter()
        local_train(cfg=cfg, env=env, global_weights=weights, server_round=server_round, run_id="b")
        times.append(time.perf_counter() - started)
print(json.dumps(times))
"""
POLL_S = 3.0  # flwr/supernode/start_client_internal.py and flwr/superlink/grid/http_grid.py
RESULTS = Path(__file__).parent / "results"


def per_round(results: dict[str, Any]) -> list[dict[str, float]]:
    """Coordinator time and the slowest site's training time of every round."""
    rows = []
    for record in results["rounds"]:
        trains = [s.get("train-time-s", 0.0) for s in record["sites"].values()]
        rows.append(
            {
                "round": record["round"],
                "duration_s": record["duration_s"],
                "site_train_max_s": max(trains, default=0.0),
                "site_train_sum_s": sum(trains),
            }
        )
    return rows


def simulate(overrides: list[str], runtime: str, workdir: Path) -> list[dict[str, float]]:
    cfg = load_config(
        [
            *overrides,
            f"simulation.runtime={runtime}",
            "serving.enabled=false",
            "simulation.progress=false",
        ]
    )
    return per_round(run_simulation(cfg, output_dir=workdir / runtime).results)


def deploy(overrides: list[str], sites: int, rounds: int, workdir: Path) -> dict[str, Any]:
    deployment = LocalDeployment(
        workdir / "deployment", num_sites=sites, rounds=rounds, overrides=overrides
    )
    try:
        coordinator_overrides = deployment.prepare()
        started = time.perf_counter()
        coordinator = deployment.start_coordinator(coordinator_overrides)
        for name in deployment.names:
            deployment.start_site(name)
        assert coordinator.process is not None
        if coordinator.process.wait(timeout=3600) != 0:
            raise SystemExit(f"deployment failed: {coordinator.tail(20)}")
        version = deployment.results()["model_version"]
        for name in deployment.names:
            deployment.ask_site(name, expect_version=version)
        return {"rounds": per_round(deployment.results()), "total_s": time.perf_counter() - started}
    finally:
        deployment.stop()


def cold_start(code: str, repeats: int = 5) -> float:
    """Median wall time of a fresh Python process running ``code``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def first_calls() -> list[float]:
    """``local_train`` three times in one fresh process: the first call pays the warm-up."""
    done = subprocess.run(
        [sys.executable, "-c", FIRST_CALLS], check=True, capture_output=True, text=True
    )
    times: list[float] = json.loads(done.stdout.strip().splitlines()[-1])
    return times


def measure(args: argparse.Namespace, secagg: str, workdir: Path) -> dict[str, Any]:
    overrides = [*args.overrides, f"secagg={secagg}"]
    sim = [f"federation.num_sites={args.sites}", f"federation.rounds={args.rounds}", *overrides]
    runs: dict[str, Any] = {"overrides": sim, "load": os.getloadavg()[0]}
    for runtime in args.runtimes.split(","):
        print(f"-- secagg={secagg} {runtime}", flush=True)
        if runtime == "deployment":
            runs[runtime] = deploy(overrides, args.sites, args.rounds, workdir / secagg)
        else:
            runs[runtime] = {"rounds": simulate(sim, runtime, workdir / secagg)}
    return runs


def _steady(rows: list[dict[str, float]], key: str) -> float:
    later = [r[key] for r in rows if r["round"] > 1] or [r[key] for r in rows]
    return statistics.median(later)


def render(data: dict[str, Any]) -> str:
    lines = [
        "# Round latency: deployment vs simulation",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Machine: {data['machine']}, {data['cores']} CPUs shared with other jobs; absolute "
        "numbers are noisy, ratios less so. ClientApp cold start (median of 5 fresh processes): "
        f"{data['cold']['flower']:.1f} s for Flower's `flwr-clientapp` imports alone, "
        f"{data['cold']['clientapp']:.1f} s with our ClientApp (torch, opacus, fedinfer). "
        "In a fresh process the first `local_train` of a site (DP-SGD, 1 epoch) takes "
        f"{data['first_calls'][0]:.1f} s, the next ones {data['first_calls'][1]:.1f} s and "
        f"{data['first_calls'][2]:.1f} s: a deployment's ClientApp, new for every message, pays "
        "that warm-up (Opacus and torch first-call set-up) inside every site's `train-time-s`.",
    ]
    for secagg, runs in data["configs"].items():
        lines += _config_section(secagg, runs, data)
    return "\n".join(lines) + "\n"


def _config_section(secagg: str, runs: dict[str, Any], data: dict[str, Any]) -> list[str]:
    runtimes = [r for r in ("inprocess", "ray", "deployment") if r in runs]
    lines = [
        "",
        f"## secagg={secagg}",
        "",
        f"Overrides: `{' '.join(runs['overrides'])}` (load average at start {runs['load']:.1f}).",
        "",
        "| round | " + " | ".join(runtimes) + " |",
        "|---|" + "---|" * len(runtimes),
    ]
    rounds = len(runs[runtimes[0]]["rounds"])
    for i in range(rounds):
        cells = [f"{runs[r]['rounds'][i]['duration_s']:.1f}" for r in runtimes]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    steady = {r: _steady(runs[r]["rounds"], "duration_s") for r in runtimes}
    cells = " | ".join(f"{steady[r]:.1f}" for r in runtimes)
    lines.append(f"| steady (median of rounds 2..) | {cells} |")
    if "deployment" in runs:
        lines += _breakdown(secagg, runs["deployment"], data, steady["deployment"])
    return lines


def _breakdown(
    secagg: str, dep: dict[str, Any], data: dict[str, Any], measured: float
) -> list[str]:
    sites, cores, cold = data["sites"], data["cores"], data["cold"]["clientapp"]
    exchanges = 3 if secagg == "on" else 2  # train, (unmask,) evaluate; set-up is round 1 only
    train_max = _steady(dep["rounds"], "site_train_max_s")
    train_sum = _steady(dep["rounds"], "site_train_sum_s")
    polling = exchanges * POLL_S
    one_machine_per_site = polling + exchanges * cold + train_max
    shared = polling + (exchanges * sites * cold + train_sum) / cores
    return [
        "",
        f"Deployment wall time, coordinator start to the last site serving the model: "
        f"{dep['total_s']:.0f} s.",
        "",
        f"A steady-state round is {exchanges} message exchanges "
        f"({'train, unmask, evaluate' if exchanges == 3 else 'train, evaluate'}); in each, every "
        "site's SuperNode picks the message up on its next poll, starts a fresh ClientApp process, "
        "runs the handler and pushes the reply, and the ServerApp collects the replies on its "
        "next poll.",
        "",
        "| part of a steady-state deployment round | seconds |",
        "|---|---|",
        f"| Flower polling: {exchanges} exchanges x (1.5 s + 1.5 s) | {polling:.1f} |",
        f"| ClientApp cold start: {exchanges} exchanges x {cold:.1f} s | {exchanges * cold:.1f} |",
        f"| site training (slowest site's `train-time-s`) | {train_max:.1f} |",
        f"| **sum, one machine per site** | **{one_machine_per_site:.1f}** |",
        f"| here, {sites} sites share {cores} cores: polling + ({exchanges} x {sites} cold starts "
        f"+ all sites' training) / {cores} | **{shared:.1f}** |",
        f"| **measured** (median `duration_s`, rounds 2..) | **{measured:.1f}** |",
        "",
        "The rest of the measured time is the machine's other load and the per-message work of "
        "Flower's SuperNode/SuperExec and SuperLink (serialising, object store, HTTPS through the "
        "gateway). The simulation pays only the training (and, on Ray, actor scheduling): its "
        "ClientApp is imported once and messages are handed over in memory. The fixed per-round "
        f"cost of a deployment, about {polling + exchanges * cold:.0f} s here, is what a site's "
        "compute must be large against; it does not grow with model or data size.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--secagg", default="off,on", help="comma-separated: off, on")
    parser.add_argument("--runtimes", default="inprocess,ray,deployment")
    parser.add_argument(
        "--report-only", action="store_true", help="re-render the saved measurements"
    )
    parser.add_argument(
        "overrides", nargs="*", default=["dataset.num_samples=2000", "federation.local_epochs=1"]
    )
    args = parser.parse_args()
    raw = RESULTS / "deployment.json"
    if args.report_only:
        data = json.loads(raw.read_text())
        if "first_calls" not in data:
            data["first_calls"] = first_calls()
            raw.write_text(json.dumps(data, indent=2))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="fedinfer-bench-deploy-"))
        try:
            configs = {s: measure(args, s, workdir) for s in args.secagg.split(",")}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        cold = {
            "flower": cold_start("import flwr.supernode.cli.flwr_clientapp"),
            "clientapp": cold_start(CLIENTAPP_IMPORT),
        }
        data = {
            "command": " ".join(["python bench/deployment_latency.py", *sys.argv[1:]]),
            "machine": platform.machine(),
            "cores": os.cpu_count(),
            "sites": args.sites,
            "cold": cold,
            "first_calls": first_calls(),
            "configs": configs,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(data, indent=2))
    (RESULTS / "deployment.md").write_text(render(data))
    print((RESULTS / "deployment.md").read_text())


if __name__ == "__main__":
    main()
