"""Round latency: one federation as a simulation and as a real deployment; where the time goes.

The same config on three runtimes:

- ``inprocess``: the simulation's sequential in-process grid (ClientApp objects called directly);
- ``ray``: Flower's simulation runtime (the default of ``fedinfer simulate``);
- ``deployment``: ``fedinfer deploy local`` (SuperLink + gateway + one SuperNode, one site worker
  and one inference server per site, TLS and node authentication; the site worker claims every
  message from its SuperNode and runs the site's own ClientApp in process).

Per round it reports the coordinator's ``duration_s`` and its stages (``timings`` in
``results.json``: the train exchange, aggregation with secure aggregation's unmask exchange, the
evaluate exchange), for secagg off and on and 2 and 5 sites; with ``--baseline`` also the
deployment of an older source tree, run right before this tree's for each config. Cold starts of
a ClientApp process (Flower's imports alone, the in-process ClientApp), which older trees paid per
message, are measured separately in fresh processes.

    python bench/deployment_latency.py --label deployment_after   # -> results/<label>.md
    # this tree next to an older one (a `git archive` of it), interleaved config by config:
    cd /tmp && python $REPO/bench/deployment_latency.py --label deployment_after --baseline OLD
    python bench/deployment_latency.py --label deployment_after --report-only  # re-render
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
RESULTS = Path(__file__).parent / "results"


def per_round(results: dict[str, Any]) -> list[dict[str, float]]:
    """Coordinator time per round and stage, and the slowest site's training time."""
    rows = []
    for record in results["rounds"]:
        trains = [s.get("train-time-s", 0.0) for s in record["sites"].values()]
        timings = record.get("timings", {})
        rows.append(
            {
                "round": record["round"],
                "duration_s": record["duration_s"],
                "train_s": timings.get("train", 0.0),
                "aggregate_s": timings.get("aggregate", 0.0),
                "evaluate_s": timings.get("evaluate", 0.0),
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


@contextlib.contextmanager
def code_from(tree: Path | None) -> Iterator[None]:
    """Run the deployment's processes (coordinator, sites, ClientApps) from ``tree``'s fedinfer."""
    previous = os.environ.get("PYTHONPATH")
    if tree is not None:
        os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


def run_federation(deployment: LocalDeployment, coordinator_overrides: list[str]) -> None:
    """Start the prepared deployment's coordinator and sites; return when the federation ends."""
    coordinator = deployment.start_coordinator(coordinator_overrides)
    for name in deployment.names:
        deployment.start_site(name)
    assert coordinator.process is not None
    if coordinator.process.wait(timeout=3600) != 0:
        raise SystemExit(f"deployment failed: {coordinator.tail(20)}")


def deploy(
    overrides: list[str], sites: int, rounds: int, workdir: Path, *, tree: Path | None = None
) -> dict[str, Any]:
    deployment = LocalDeployment(
        workdir / ("baseline" if tree else "deployment"),
        num_sites=sites,
        rounds=rounds,
        overrides=overrides,
    )
    try:
        coordinator_overrides = deployment.prepare()
        started = time.perf_counter()
        run_federation(deployment, coordinator_overrides)
        version = deployment.results()["model_version"]
        for name in deployment.names:
            deployment.ask_site(name, expect_version=version)
        return {"rounds": per_round(deployment.results()), "total_s": time.perf_counter() - started}
    finally:
        deployment.stop()


def deploy_from(
    tree: Path, overrides: list[str], sites: int, rounds: int, workdir: Path
) -> dict[str, Any]:
    """:func:`deploy` with ``tree``'s code: every process of the deployment, and the set-up too.

    The set-up (PKI, keys, site policies) runs in a child process importing ``tree``'s
    fedinfer, so an older tree's sites get the policy files their own code writes (a policy
    key added since would be refused by them).
    """
    request = {"overrides": overrides, "sites": sites, "rounds": rounds, "workdir": str(workdir)}
    result = workdir / "baseline-result.json"
    workdir.mkdir(parents=True, exist_ok=True)
    with code_from(tree):
        subprocess.run(
            [sys.executable, __file__, "--deploy-in-child", json.dumps(request), str(result)],
            check=True,
            cwd=tempfile.gettempdir(),  # not a directory holding this tree's fedinfer/
        )
    answer: dict[str, Any] = json.loads(result.read_text())
    return answer


def _deploy_in_child(request_json: str, result: str) -> None:
    request = json.loads(request_json)
    runs = deploy(
        request["overrides"],
        request["sites"],
        request["rounds"],
        Path(request["workdir"]),
        tree=Path(os.environ["PYTHONPATH"]),
    )
    Path(result).write_text(json.dumps(runs))


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


def measure(args: argparse.Namespace, secagg: str, sites: int, workdir: Path) -> dict[str, Any]:
    overrides = [*args.overrides, f"secagg={secagg}"]
    if secagg == "on" and sites < 3:  # below a site's default secure-aggregation floor of 3
        overrides.append(f"site_policy.secagg_min_participants={sites}")
    sim = [f"federation.num_sites={sites}", f"federation.rounds={args.rounds}", *overrides]
    runs: dict[str, Any] = {"overrides": sim, "load": os.getloadavg()[0]}
    workdir = workdir / f"{secagg}-{sites}"
    for runtime in args.runtimes.split(","):
        print(f"-- secagg={secagg} sites={sites} {runtime}", flush=True)
        if runtime == "deployment":
            if args.baseline is not None:  # interleaved: both under the same machine load
                print(f"-- secagg={secagg} sites={sites} baseline deployment", flush=True)
                runs["baseline"] = deploy_from(args.baseline, overrides, sites, args.rounds, workdir)
            runs[runtime] = deploy(overrides, sites, args.rounds, workdir)
        else:
            runs[runtime] = {"rounds": simulate(sim, runtime, workdir)}
    return runs


def _steady(rows: list[dict[str, float]], key: str) -> float:
    later = [r[key] for r in rows if r["round"] > 1] or [r[key] for r in rows]
    return statistics.median(later)


def _exchanges(secagg: str, dep: dict[str, Any]) -> int:
    """Message exchanges in a steady round: train, (unmask,) and evaluate if the sites allow it."""
    evaluates = _steady(dep["rounds"], "evaluate_s") > 0.5
    return 1 + (secagg == "on") + evaluates


def render(data: dict[str, Any]) -> str:
    cold = data["cold"]
    base = data.get("baseline")
    lines = [
        f"# Round latency: deployment vs simulation ({data.get('label', '')})",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Machine: {data['machine']}, {data['cores']} CPUs shared with other jobs; absolute "
        "numbers are noisy, ratios less so"
        + (
            f"; `baseline` is the deployment of `{base}` run right before this tree's, config "
            "by config, under the same load"
            if base
            else ""
        )
        + ". Cold start of a fresh process (median of 5): "
        f"{cold['flower']:.1f} s for Flower's `flwr-clientapp` imports alone, "
        f"{cold['clientapp']:.1f} s importing the in-process ClientApp (torch, opacus, fedinfer)"
        + ". In a fresh process the first `local_train` of a site (DP-SGD, 1 epoch) takes "
        f"{data['first_calls'][0]:.1f} s, the next ones {data['first_calls'][1]:.1f} s and "
        f"{data['first_calls'][2]:.1f} s.",
        "",
        "Steady round = median `duration_s` of rounds 2..R. Goal (issue 15): deployment minus "
        "simulation <= Flower's polling floor (an idle SuperNode sleeps 3 s between polls: "
        "1.5 s per exchange on average) + 1 s per exchange, i.e. 2.5 s per exchange.",
        "",
        "| secagg | sites | in-process sim | Ray sim |"
        + (" baseline deployment |" if base else "")
        + " deployment | deployment - Ray | exchanges | goal (2.5 s x exchanges) |",
        "|---|---|---|---|" + ("---|" if base else "") + "---|---|---|---|",
    ]
    for runs in data["configs"].values():
        steady = {
            r: _steady(runs[r]["rounds"], "duration_s") if r in runs else float("nan")
            for r in ("inprocess", "ray", "baseline", "deployment")
        }
        n = _exchanges(runs["secagg"], runs["deployment"]) if "deployment" in runs else 0
        lines.append(
            f"| {runs['secagg']} | {runs['sites']} | {steady['inprocess']:.1f} | "
            f"{steady['ray']:.1f} |"
            + (f" {steady['baseline']:.1f} |" if base else "")
            + f" {steady['deployment']:.1f} | {steady['deployment'] - steady['ray']:.1f} | {n} | "
            f"{2.5 * n:.1f} |"
        )
    lines += [
        "",
        "Where a steady deployment round goes (medians of rounds 2..R, seconds): the train "
        "exchange (push, every SuperNode's next poll, the site worker's claim (before: a "
        "ClientApp process), the handler, the reply, the ServerApp's next pull), the "
        "aggregation (with secure aggregation its unmask "
        "exchange), the evaluate exchange (none in steady DP rounds: the sites' policies refuse "
        "evaluation in DP mode, and are not asked again). Sites do not release their training "
        "time in DP mode, so one site's training is taken from the in-process simulation "
        "(its train stage / sites: the sites train one after another there). Overhead per "
        "exchange = (round - one site's training) / exchanges.",
        "",
        "| secagg | sites | deployment | round | train exchange | aggregate (unmask) "
        "| evaluate exchange | one site's training (in-process) | overhead per exchange |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for runs in data["configs"].values():
        work = _steady(runs["inprocess"]["rounds"], "train_s") / runs["sites"]
        for variant in ("baseline", "deployment"):
            if variant not in runs:
                continue
            rows = runs[variant]["rounds"]
            med = {k: _steady(rows, k) for k in rows[0] if k != "round"}
            n = _exchanges(runs["secagg"], runs[variant])
            lines.append(
                f"| {runs['secagg']} | {runs['sites']} | {variant} | {med['duration_s']:.1f} | "
                f"{med['train_s']:.1f} | {med['aggregate_s']:.1f} | {med['evaluate_s']:.1f} | "
                f"{work:.2f} | {(med['duration_s'] - work) / n:.1f} |"
            )
    lines += ["", "Per round (`duration_s`, seconds):", ""]
    for runs in data["configs"].values():
        runtimes = [r for r in ("inprocess", "ray", "baseline", "deployment") if r in runs]
        totals = ", ".join(
            f"{r} {runs[r]['total_s']:.0f} s" for r in ("baseline", "deployment") if r in runs
        )
        lines += [
            f"secagg={runs['secagg']}, {runs['sites']} sites, overrides "
            f"`{' '.join(runs['overrides'])}` (load average at start {runs['load']:.1f})"
            + (f"; wall time, coordinator start to the last site serving: {totals}" if totals else ""),
            "",
            "| round | " + " | ".join(runtimes) + " |",
            "|---|" + "---|" * len(runtimes),
        ]
        for i in range(len(runs[runtimes[0]]["rounds"])):
            cells = [f"{runs[r]['rounds'][i]['duration_s']:.1f}" for r in runtimes]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--deploy-in-child"]:  # deploy_from's child: an older tree's code
        _deploy_in_child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sites", default="2,5", help="comma-separated federation sizes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--secagg", default="off,on", help="comma-separated: off, on")
    parser.add_argument("--runtimes", default="inprocess,ray,deployment")
    parser.add_argument("--label", default="deployment", help="results/<label>.{json,md}")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a source tree (e.g. `git archive` of an older commit) whose deployment runs "
        "interleaved with this one's, config by config",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="re-render the saved measurements"
    )
    parser.add_argument(
        "overrides", nargs="*", default=["dataset.num_samples=2000", "federation.local_epochs=1"]
    )
    args = parser.parse_args()
    if args.baseline is not None and (Path.cwd() / "fedinfer").is_dir():
        # `python -m fedinfer` puts the working directory before $PYTHONPATH on sys.path
        raise SystemExit("--baseline: run from a directory without a fedinfer/ package (e.g. /tmp)")
    raw = RESULTS / f"{args.label}.json"
    if args.report_only:
        data = json.loads(raw.read_text())
    else:
        workdir = Path(tempfile.mkdtemp(prefix="fedinfer-bench-deploy-"))
        configs = {}
        try:
            for secagg in args.secagg.split(","):
                for sites in (int(n) for n in args.sites.split(",")):
                    runs = measure(args, secagg, sites, workdir)
                    configs[f"secagg={secagg},sites={sites}"] = {
                        "secagg": secagg,
                        "sites": sites,
                        **runs,
                    }
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        cold = {
            "flower": cold_start("import flwr.supernode.cli.flwr_clientapp"),
            "clientapp": cold_start(CLIENTAPP_IMPORT),
        }
        data = {
            "label": args.label,
            "baseline": str(args.baseline) if args.baseline else None,
            "command": " ".join(["python bench/deployment_latency.py", *sys.argv[1:]]),
            "machine": platform.machine(),
            "cores": os.cpu_count(),
            "cold": cold,
            "first_calls": first_calls(),
            "configs": configs,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(data, indent=2))
    (RESULTS / f"{args.label}.md").write_text(render(data))
    print((RESULTS / f"{args.label}.md").read_text())


if __name__ == "__main__":
    main()
