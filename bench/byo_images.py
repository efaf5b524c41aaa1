"""The image example's accuracy: centralized vs federated without DP vs federated with DP-SGD.

All three train ``examples.images.net.DigitsCnn`` (16 channels) on the same sites' training
splits of scikit-learn's digits as ``(1, 8, 8)`` images and are scored on the same pooled test
split; the federated runs are the example's (4 sites, IID, 10 rounds of 1 local epoch), the
centralized one trains on the union of the sites' training splits for 10 epochs with the same
optimizer settings. Run from the repository root::

    python bench/byo_images.py [--rounds 10] [--seeds 0 1 2]

It prints a Markdown table (mean and range over the seeds); results go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def centralized(cfg: object, *, epochs: int, seed: int) -> float:
    """Train on the pooled training splits of every site; accuracy on the pooled test split."""
    import numpy as np
    import torch

    from fedinfer.data import ArrayDataset, build_federated_data
    from fedinfer.models import build_model
    from fedinfer.training import evaluate, make_loader, train_epochs

    data = build_federated_data(cfg)  # type: ignore[arg-type]
    train = ArrayDataset(
        np.concatenate([s.train.x for s in data.sites]),
        np.concatenate([s.train.y for s in data.sites]),
        data.num_classes,
    )
    torch.manual_seed(seed)
    model = build_model(
        cfg.model,  # type: ignore[attr-defined]
        input_dim=data.input_dim,
        num_classes=data.num_classes,
    )
    fed = cfg.federation  # type: ignore[attr-defined]
    optimizer = torch.optim.SGD(model.parameters(), lr=fed.lr, momentum=fed.momentum)
    loader = make_loader(train, batch_size=fed.batch_size, shuffle=True, seed=seed)
    train_epochs(model, loader, optimizer, epochs=epochs, device=torch.device("cpu"))
    return evaluate(model, data.pooled_test, device=torch.device("cpu")).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, paths))

    from examples.images.run import overrides
    from fedinfer.config import load_config
    from fedinfer.simulation import run_simulation

    rows: dict[str, list[float]] = {"centralized": [], "federated, no DP": [], "federated, DP": []}
    eps: list[float] = []
    for seed in args.seeds:
        extra = [f"seed={seed}", "simulation.progress=false"]
        plain, private = (
            load_config(
                [*overrides(sites=4, rounds=args.rounds, runtime="inprocess", epsilon=8.0, dp=dp),
                 *extra]
            )  # fmt: skip
            for dp in (False, True)
        )
        with tempfile.TemporaryDirectory() as tmp:
            r_plain = run_simulation(plain, output_dir=Path(tmp) / "plain")
            r_dp = run_simulation(private, output_dir=Path(tmp) / "dp")
        rows["centralized"].append(centralized(plain, epochs=args.rounds, seed=seed))
        rows["federated, no DP"].append(float(r_plain.final_accuracy or 0.0))
        rows["federated, DP"].append(float(r_dp.final_accuracy or 0.0))
        eps.append(float(r_dp.results.get("max_epsilon") or 0.0))  # type: ignore[attr-defined]
    print(f"| setting | accuracy (mean of {len(args.seeds)} seeds) | range |")
    print("|---|---|---|")
    for name, values in rows.items():
        label = f"{name} (epsilon {statistics.mean(eps):.2f})" if name.endswith(", DP") else name
        print(f"| {label} | {statistics.mean(values):.3f} | {min(values):.3f}-{max(values):.3f} |")


if __name__ == "__main__":
    main()
