"""Per-round wall time of a fedinfer simulation vs a bare Flower app doing the same work.

Both run on Flower's simulation runtime (Ray) in this one process, side by side,
with the same model, data partition, sites, rounds and local training (no DP,
no secure aggregation: the bare app has neither). Start-up (Ray) is reported
separately from steady-state rounds (rounds 2..R), and peak RSS of this process
tree is reported too.

    python bench/sim_overhead.py --sites 10 --rounds 6 [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation as flwr_run_simulation

from fedinfer.config import load_config
from fedinfer.data import build_federated_data
from fedinfer.models import build_model
from fedinfer.simulation import run_simulation
from fedinfer.training import evaluate, make_loader, train_epochs


def bare_flower(cfg, rounds: int) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    """The same federation as a minimal Flower app; returns (start-up s, per-round s)."""
    data = build_federated_data(cfg)
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        site = data.sites[int(context.node_config["partition-id"])]
        model = build_model(cfg.model, input_dim=site.input_dim, num_classes=site.num_classes)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.federation.lr, momentum=cfg.federation.momentum
        )
        loader = make_loader(site.train, batch_size=cfg.federation.batch_size, shuffle=True, seed=0)
        result = train_epochs(
            model, loader, opt, epochs=cfg.federation.local_epochs, device=torch.device("cpu")
        )
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord(model.state_dict()),
                    "metrics": MetricRecord({"num-examples": len(site.train), "loss": result.loss}),
                }
            ),
            reply_to=msg,
        )

    @client.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        site = data.sites[int(context.node_config["partition-id"])]
        model = build_model(cfg.model, input_dim=site.input_dim, num_classes=site.num_classes)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        r = evaluate(model, site.test, device=torch.device("cpu"))
        return Message(
            RecordDict(
                {"metrics": MetricRecord({"num-examples": r.num_examples, "acc": r.accuracy})}
            ),
            reply_to=msg,
        )

    stamps: list[float] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        stamps.append(time.perf_counter())
        torch.manual_seed(0)
        model = build_model(cfg.model, input_dim=data.input_dim, num_classes=data.num_classes)
        test_model = build_model(cfg.model, input_dim=data.input_dim, num_classes=data.num_classes)

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            stamps.append(time.perf_counter())
            test_model.load_state_dict(arrays.to_torch_state_dict())
            return MetricRecord(
                {
                    "accuracy": evaluate(
                        test_model, data.pooled_test, device=torch.device("cpu")
                    ).accuracy
                }
            )

        FedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2).start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            evaluate_fn=central,
        )

    started = time.perf_counter()
    flwr_run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=cfg.federation.num_sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0},
            "init_args": {"logging_level": "ERROR", "log_to_driver": False},
        },
    )
    round_times = list(np.diff(stamps[1:]))  # stamps: main start, eval(0), eval(1..R)
    return stamps[1] - started, [float(x) for x in round_times]


def ours(cfg, out: Path) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = run_simulation(cfg, output_dir=out)
    rounds = [r["duration_s"] for r in result.results["rounds"]]
    total = time.perf_counter() - started
    return total - sum(rounds), rounds


def peak_rss_mb() -> dict[str, float]:
    """Peak RSS of this process (driver + ServerApp) and the largest reaped child (Ray workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"driver_mb": round(own, 1), "largest_child_mb": round(children, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedinfer-bench-overhead"))
    args = parser.parse_args()
    cfg = load_config(
        [
            "privacy=none",
            "secagg=off",
            "serving.enabled=false",
            f"federation.num_sites={args.sites}",
            f"federation.rounds={args.rounds}",
            "simulation.progress=false",
        ]
    )
    bare_start, bare_rounds = bare_flower(cfg, args.rounds)
    our_start, our_rounds = ours(cfg, args.out)
    bare_ss, our_ss = statistics.median(bare_rounds[1:]), statistics.median(our_rounds[1:])
    report = {
        "sites": args.sites,
        "rounds": args.rounds,
        # Flower starts the ServerApp while Ray is still starting, so Ray's start-up lands in
        # round 1.
        "bare_flower": {
            "first_round_s": round(bare_rounds[0], 2),
            "median_round_s": round(bare_ss, 3),
        },
        "fedinfer": {
            "first_round_s": round(our_rounds[0], 2),
            "outside_rounds_s": round(our_start, 2),
            "median_round_s": round(our_ss, 3),
        },
        "ratio_round_time": round(our_ss / bare_ss, 3),
        "peak_rss": peak_rss_mb(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
