"""Round latency: one federation as a simulation and as a real deployment; where the time goes.

One config, three runtimes:

- ``inprocess``: the simulation's sequential in-process grid (ClientApp objects called directly);
- ``ray``: Flower's simulation runtime (the default of ``fedinfer simulate``);
- ``deployment``: ``fedinfer deploy local`` (SuperLink + gateway + one SuperNode and one
  inference server per site, TLS and node authentication, every message a new ClientApp process).

Per round it reports the coordinator's ``duration_s`` from ``results.json``; the breakdown
for the deployment adds the parts measured separately: the ClientApp process cold start
(``python`` + importing our ClientApp, timed in a fresh process), the sites' own training
time (``train-time-s`` each site reports), and Flower's polling (SuperNodes poll the
SuperLink every 3 s for messages and the ServerApp polls every 3 s for replies, so each
message exchange waits 0-3 s at each end; 1.5 s each on average).

    python bench/deployment_latency.py            # writes bench/results/deployment.md
"""

from __future__ import annotations

import argparse
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
POLL_S = 3.0  # flwr/supernode/start_client_internal.py and flwr/superlink/grid/http_grid.py


def per_round(results: dict[str, Any]) -> list[dict[str, float]]:
    rows = []
    for record in results["rounds"]:
        trains = [s.get("train-time-s", 0.0) for s in record["sites"].values()]
        rows.append(
            {
                "round": record["round"],
                "duration_s": record["duration_s"],
                "site_train_max_s": max(trains, default=0.0),
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


def deploy(
    overrides: list[str], num_sites: int, rounds: int, workdir: Path
) -> tuple[list[dict[str, float]], float]:
    deployment = LocalDeployment(
        workdir / "deployment", num_sites=num_sites, rounds=rounds, overrides=overrides
    )
    try:
        coordinator_overrides = deployment.prepare()
        started = time.perf_counter()
        coordinator = deployment.start_coordinator(coordinator_overrides)
        for name in deployment.names:
            deployment.start_site(name)
        assert coordinator.process is not None
        code = coordinator.process.wait(timeout=3600)
        total = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"deployment failed: {coordinator.tail(20)}")
        version = deployment.results()["model_version"]
        for name in deployment.names:
            deployment.ask_site(name, expect_version=version)
        return per_round(deployment.results()), total
    finally:
        deployment.stop()


def cold_start(code: str, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def report(
    args: argparse.Namespace,
    overrides: list[str],
    runs: dict[str, list[dict[str, float]]],
    deploy_total: float,
    cold: dict[str, float],
    command: str,
) -> str:
    exchanges = 4 if "secagg=on" in overrides else 2
    kinds = "train, evaluate" + (", secagg setup, unmask" if exchanges == 4 else "")
    medians = {n: statistics.median(r["duration_s"] for r in rs) for n, rs in runs.items() if rs}
    nan = float("nan")
    lines = [
        "# Round latency: deployment vs simulation",
        "",
        f"Command: `{command}`",
        "",
        f"Config: {args.sites} sites, {args.rounds} rounds, overrides `{' '.join(overrides)}`.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average at start {args.load:.1f} "
        "(shared machine: absolute numbers are noisy, ratios less so).",
        "",
        "## Per-round coordinator time (`results.json` `duration_s`, seconds)",
        "",
        "| round | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for i in range(args.rounds):
        cells = [f"{rows[i]['duration_s']:.1f}" if i < len(rows) else "-" for rows in runs.values()]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines.append("| median | " + " | ".join(f"{medians.get(n, nan):.1f}" for n in runs) + " |")
    dep = runs.get("deployment", [])
    train = statistics.median(r["site_train_max_s"] for r in dep) if dep else nan
    per_exchange = POLL_S + cold["clientapp"]  # two polls of 1.5 s on average, one cold start
    lines += [
        "",
        "Deployment wall time, coordinator start to last site serving the model: "
        f"{deploy_total:.0f} s.",
        "",
        "## Where a deployment round goes",
        "",
        f"A round is {exchanges} message exchanges ({kinds}). In each, the SuperNode picks",
        "the message up on its next 3 s poll, starts a fresh ClientApp process, runs the",
        "handler and pushes the reply; the ServerApp collects it on its next 3 s poll.",
        "",
        "| part | seconds | per round |",
        "|---|---|---|",
        f"| Flower polling, both ends (1.5 s + 1.5 s on average) | {POLL_S:.1f} "
        f"| {exchanges * POLL_S:.1f} |",
        f"| ClientApp cold start: bare `flwr-clientapp` imports | {cold['flower']:.1f} | - |",
        f"| ClientApp cold start: + our ClientApp (torch, opacus, fedinfer) "
        f"| {cold['clientapp']:.1f} | {exchanges * cold['clientapp']:.1f} |",
        f"| site training (slowest site's `train-time-s`, median) | {train:.1f} | {train:.1f} |",
        f"| **estimate** | | **{exchanges * per_exchange + train:.1f}** |",
        f"| **measured** (median `duration_s`) | | **{medians.get('deployment', nan):.1f}** |",
        "",
        "The simulation pays only the training (and, on Ray, actor scheduling): the ClientApp is",
        "imported once, and messages are handed over in memory.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtimes", default="inprocess,ray,deployment")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "deployment.md"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=["secagg=off", "dataset.num_samples=2000", "federation.local_epochs=1"],
    )
    args = parser.parse_args()
    args.load = os.getloadavg()[0]
    overrides = [
        f"federation.num_sites={args.sites}",
        f"federation.rounds={args.rounds}",
        *args.overrides,
    ]
    workdir = Path(tempfile.mkdtemp(prefix="fedinfer-bench-deploy-"))
    runs: dict[str, list[dict[str, float]]] = {}
    deploy_total = float("nan")
    try:
        for runtime in args.runtimes.split(","):
            print(f"-- {runtime}", flush=True)
            if runtime == "deployment":
                runs[runtime], deploy_total = deploy(
                    args.overrides, args.sites, args.rounds, workdir
                )
            else:
                runs[runtime] = simulate(overrides, runtime, workdir)
        cold = {
            "flower": cold_start("import flwr.supernode.cli.flwr_clientapp"),
            "clientapp": cold_start(CLIENTAPP_IMPORT),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    command = "python bench/deployment_latency.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(args, overrides, runs, deploy_total, cold, command.strip()))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
