"""The regression example's RMSE: centralized baselines vs federated, without and with DP-SGD.

All runs use scikit-learn's diabetes set as ``examples/regression/run.py`` writes it
(standardized features and target), the same sites' splits (4 sites, IID) and the same pooled
test split. Federated: ``examples.regression.net.TabularRegressor``, 30 rounds of 1 local epoch,
``task=regression``; without DP (``privacy=none secagg=off``) and with DP-SGD (epsilon 8) +
secure aggregation. Centralized: the same network on the union of the sites' training splits
for 30 epochs (learning rate picked on the pooled validation split), and least squares.
Run from the repository root::

    python bench/byo_regression.py [--rounds 30] [--seeds 0 1 2]

It prints a Markdown table (RMSE in the target's units, mean and range over the seeds);
results go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, paths))

    from examples.regression.run import centralized, overrides, write_data
    from fedinfer.config import load_config
    from fedinfer.simulation import run_simulation

    rows: dict[str, list[float]] = {
        "centralized, least squares": [],
        "centralized, same network": [],
        "federated, no DP": [],
        "federated, DP-SGD + secure aggregation": [],
    }
    eps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "diabetes.npz"
        _, std = write_data(data)
        for seed in args.seeds:
            extra = [f"seed={seed}", "simulation.progress=false"]
            plain, private = (
                load_config(
                    [*overrides(data=data, sites=4, rounds=args.rounds, runtime="inprocess",
                                epsilon=8.0, dp=dp), *extra]
                )  # fmt: skip
                for dp in (False, True)
            )
            r_plain = run_simulation(plain, output_dir=Path(tmp) / f"plain-{seed}")
            r_dp = run_simulation(private, output_dir=Path(tmp) / f"dp-{seed}")
            base = centralized(plain, epochs=args.rounds, seed=seed)
            rows["centralized, least squares"].append(base["least_squares_rmse"] * std)
            rows["centralized, same network"].append(base["centralized_rmse"] * std)
            rows["federated, no DP"].append(r_plain.final_metrics["rmse"] * std)
            rows["federated, DP-SGD + secure aggregation"].append(r_dp.final_metrics["rmse"] * std)
            eps.append(float(r_dp.results.get("max_epsilon") or 0.0))
    print(f"Predicting the mean everywhere: RMSE {std:.1f} (the target's standard deviation)\n")
    print(f"| setting | test RMSE (mean of {len(args.seeds)} seeds) | range |")
    print("|---|---|---|")
    for name, values in rows.items():
        label = f"{name} (epsilon {statistics.mean(eps):.2f})" if "DP-SGD" in name else name
        print(f"| {label} | {statistics.mean(values):.1f} | {min(values):.1f}-{max(values):.1f} |")


if __name__ == "__main__":
    main()
