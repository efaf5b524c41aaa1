"""Federate a tabular regression model on scikit-learn's diabetes set with DP-SGD + secure
aggregation; report its RMSE against a centralized baseline.

One command, from the repository root::

    python examples/regression/run.py          # --runtime inprocess for a quicker run

Steps: (1) scikit-learn's bundled diabetes set (442 patients, 10 features, a disease progression
score; nothing downloaded) is written to an NPZ file with standardized features and target;
(2) a simulation of 4 sites trains ``examples.regression.net.TabularRegressor`` with
``task=regression`` (MSE loss; RMSE, MAE and R^2 in the round table), DP-SGD and secure
aggregation; (3) the same model is trained centrally on the union of the sites' training
splits (no DP) and scikit-learn's least squares is fitted, both scored on the same pooled test
split; (4) ``fedinfer predict`` scores the test split with site-00's signed model (a ``value``
column). RMSEs are reported in the score's own units.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TARGET = "examples.regression.net.TabularRegressor"


def write_data(path: Path) -> tuple[float, float]:
    """Write the diabetes set as ``x``/``y`` arrays; return the target's (mean, std).

    Features and target are standardized with the pooled statistics (an example's shortcut:
    real sites would agree on the constants beforehand).
    """
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    mean, std = float(y.mean()), float(y.std())
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x.astype(np.float32), y=((y - mean) / std).astype(np.float32))
    return mean, std


def overrides(
    *, data: Path, sites: int, rounds: int, runtime: str, epsilon: float, dp: bool = True
) -> list[str]:
    """The Hydra overrides of the example's federation (``dp=False``: without DP and secagg)."""
    privacy = (
        ["privacy=dpsgd", f"privacy.target_epsilon={epsilon}", "secagg=on"]
        if dp
        else ["privacy=none", "secagg=off"]
    )
    return [
        "task=regression",  # MSE loss; rmse, mae, r2; served `values`
        "dataset=csv",
        f"dataset.path={data}",
        "model=custom",
        f"model._target_={TARGET}",
        *privacy,
        f"federation.num_sites={sites}",
        f"federation.rounds={rounds}",
        "federation.local_epochs=1",
        "federation.batch_size=16",
        "federation.lr=0.05",
        "partition=iid",  # dirichlet / shards would split quantile bins of the target
        "serving.enabled=false",
        f"simulation.runtime={runtime}",
    ]


def centralized(cfg: Any, *, epochs: int, seed: int) -> dict[str, float]:
    """RMSE (standardized units) on the pooled test split of two centralized baselines.

    ``centralized_rmse``: the same network trained on the union of the sites' training splits
    for ``epochs`` epochs with the federation's optimizer, its learning rate picked from
    ``LEARNING_RATES`` on the pooled validation split (no DP). ``least_squares_rmse``:
    ordinary least squares on the same rows.
    """
    from sklearn.linear_model import LinearRegression

    from fedinfer.data import build_federated_data

    data = build_federated_data(cfg)
    train = _pooled([s.train for s in data.sites])
    val = _pooled([s.val for s in data.sites])
    best = min(
        (_train_central(cfg, train, val, data.pooled_test, lr=lr, epochs=epochs, seed=seed)
         for lr in LEARNING_RATES),
        key=lambda scores: scores[0],
    )  # fmt: skip
    test = data.pooled_test
    linear = LinearRegression().fit(train.x, train.y)
    ls_rmse = float(np.sqrt(np.mean((linear.predict(test.x) - test.y) ** 2)))
    return {"centralized_rmse": best[1], "least_squares_rmse": ls_rmse}


LEARNING_RATES = (0.05, 0.02, 0.01, 0.005)


def _pooled(parts: list[Any]) -> Any:
    from fedinfer.data import ArrayDataset

    return ArrayDataset(
        np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]), 1
    )


def _train_central(
    cfg: Any, train: Any, val: Any, test: Any, *, lr: float, epochs: int, seed: int
) -> tuple[float, float]:
    """(validation RMSE, test RMSE) of the network trained centrally at ``lr``."""
    import torch

    from fedinfer.models import build_model
    from fedinfer.training import evaluate, make_loader, train_epochs

    torch.manual_seed(seed)
    model = build_model(cfg.model, input_dim=train.input_dim, num_classes=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.federation.momentum)
    loader = make_loader(train, batch_size=cfg.federation.batch_size, shuffle=True, seed=seed)
    cpu = torch.device("cpu")
    train_epochs(model, loader, optimizer, epochs=epochs, device=cpu, task="regression")
    return tuple(  # type: ignore[return-value]
        evaluate(model, split, device=cpu, task="regression").metrics["rmse"]
        for split in (val, test)
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("FEDINFER_MODEL_TARGETS", None)  # predict runs the signed ONNX graph: no model code
    return env


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the example; return (and print) its summary."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/examples-regression"))
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runtime", choices=("ray", "inprocess"), default="ray")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]  # Ray workers import the model too

    from fedinfer.config import load_config
    from fedinfer.data import build_federated_data
    from fedinfer.simulation import run_simulation

    out = args.out.resolve()
    mean, std = write_data(out / "diabetes.npz")
    cfg = load_config(
        [
            *overrides(
                data=out / "diabetes.npz",
                sites=args.sites,
                rounds=args.rounds,
                runtime=args.runtime,
                epsilon=args.epsilon,
            ),
            f"seed={args.seed}",
        ]
    )
    result = run_simulation(cfg, output_dir=out)
    baseline = centralized(cfg, epochs=args.rounds, seed=args.seed)

    test = build_federated_data(cfg).pooled_test
    np.savez(out / "test.npz", x=test.x)
    store, public_key = out / "sites" / "site-00" / "models", out / "coordinator" / "signing.pub"
    subprocess.run(
        [sys.executable, "-m", "fedinfer.cli", "predict", "--model-store", str(store),
         "--input", str(out / "test.npz"), "--output", str(out / "predictions.csv"),
         "--public-key", str(public_key), "--backend", "onnx", "--no-progress"],
        env=_env(), check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    import pandas as pd

    predicted = pd.read_csv(out / "predictions.csv")["value"].to_numpy()
    predict_rmse = float(np.sqrt(np.mean((predicted - test.y) ** 2)))
    final = result.final_metrics
    summary: dict[str, object] = {
        "units": "disease progression score (target std %.1f)" % std,
        "federated_dp_rmse": final["rmse"] * std,
        "federated_dp_mae": final["mae"] * std,
        "federated_dp_r2": final["r2"],
        "centralized_rmse": baseline["centralized_rmse"] * std,
        "least_squares_rmse": baseline["least_squares_rmse"] * std,
        "predict_mean_rmse": std,  # predicting the mean everywhere
        "predict_rmse": predict_rmse * std,
        "max_epsilon": result.results.get("max_epsilon"),
        "test_rows": len(test),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
