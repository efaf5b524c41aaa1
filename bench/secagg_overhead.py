"""Per-round wall time with secure aggregation on vs off, side by side in one process.

Same federation (10 sites, cnn1d, MNIST-1D 10k, no DP), Flower's Ray runtime,
runs interleaved off/on/off/on so that machine noise hits both alike. Reports the
median steady-state round time (rounds 2..R) and the ratio, and checks that
both runs reach about the same accuracy.

    python bench/secagg_overhead.py --rounds 6 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedinfer.config import load_config
from fedinfer.simulation import run_simulation


def run(secagg: str, rounds: int, runtime: str, out: Path) -> tuple[list[float], float | None]:
    cfg = load_config(
        [
            f"secagg={secagg}",
            "privacy=none",
            "serving.enabled=false",
            f"federation.rounds={rounds}",
            f"simulation.runtime={runtime}",
            "simulation.progress=false",
        ]
    )
    result = run_simulation(cfg, output_dir=out)
    return [r["duration_s"] for r in result.results["rounds"]][1:], result.final_accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--runtime", default="ray", choices=["ray", "inprocess"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedinfer-bench-secagg"))
    args = parser.parse_args()
    times: dict[str, list[float]] = {"off": [], "on": []}
    accuracy: dict[str, float | None] = {}
    for i in range(args.repeat):
        for mode in ("off", "on"):
            rounds, acc = run(mode, args.rounds, args.runtime, args.out / f"{mode}-{i}")
            times[mode] += rounds
            accuracy[mode] = acc
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(
        json.dumps(
            {
                "runtime": args.runtime,
                "median_round_s": {"off": round(off, 3), "on": round(on, 3)},
                "ratio_on_over_off": round(on / off, 3),
                "final_accuracy": accuracy,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
