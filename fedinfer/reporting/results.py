"""``results.json``, ``accuracy.png`` and ``metrics.png`` of a run, written atomically after
every round."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedinfer.config.schema import FedInferConfig
from fedinfer.fsutil import atomic_write_bytes

__all__ = [
    "RESULTS_FILE",
    "ResultsWriter",
    "plot_accuracy",
    "plot_metrics",
    "software_versions",
    "write_json_atomic",
]

RESULTS_FILE = "results.json"


def software_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in (
        "fedinfer",
        "flwr",
        "torch",
        "opacus",
        "numpy",
        "mnist1d",
        "ray",
        "cryptography",
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old or the new file, never half of one."""
    atomic_write_bytes(path, json.dumps(data, indent=2, default=_jsonable).encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class ResultsWriter:
    """Accumulates per-round records and rewrites ``results.json`` after each round."""

    def __init__(self, output_dir: Path, *, cfg: FedInferConfig, run_id: str) -> None:
        self.path = Path(output_dir) / RESULTS_FILE
        self.data: dict[str, Any] = {
            "run_id": run_id,
            "status": "running",
            "config": asdict(cfg),
            "versions": software_versions(),
            "rounds": [],
            "final_accuracy": None,
            "final_metrics": {},
        }

    def add_round(self, record: dict[str, Any], *, elapsed_s: float) -> None:
        """Append one round and persist."""
        self.data["rounds"].append(record)
        self.data["elapsed_s"] = elapsed_s
        self.data["max_epsilon"] = max(
            (e for r in self.data["rounds"] for e in r.get("epsilon", {}).values()), default=None
        )
        self._save()

    def update_round(self, record: dict[str, Any]) -> None:
        """Replace the round of the same number (e.g. its federated metrics came later); persist."""
        rounds = self.data["rounds"]
        same = [i for i, r in enumerate(rounds) if r["round"] == record["round"]]
        rounds[same[-1]] = record
        self._save()

    def finish(self, *, status: str, **fields: Any) -> None:
        """Record the outcome (``completed``, ``stopped``, ``failed``) and persist."""
        self.data["status"] = status
        rounds = self.data["rounds"]
        accuracies = [r["accuracy"] for r in rounds if r.get("accuracy") is not None]
        self.data["final_accuracy"] = accuracies[-1] if accuracies else None
        self.data["best_accuracy"] = max(accuracies, default=None)
        evaluated = [r["metrics"] for r in rounds if r.get("metrics")]
        self.data["final_metrics"] = dict(evaluated[-1]) if evaluated else {}
        self.data["best_metrics"] = _best_metrics(evaluated)
        self.data.update(fields)
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.path, self.data)


_LOWER_IS_BETTER = ("rmse", "mae", "loss")


def _best_metrics(evaluated: list[dict[str, float]]) -> dict[str, float]:
    """Best value of each metric over the rounds (lowest for errors, highest otherwise)."""
    best: dict[str, float] = {}
    for metrics in evaluated:
        for name, value in metrics.items():
            if value is None:
                continue
            pick = min if name in _LOWER_IS_BETTER else max
            best[name] = pick(best.get(name, value), value)
    return best


def plot_metrics(results: dict[str, Any], path: Path) -> Path | None:
    """One panel per held-out metric of the task (rmse/mae/r2, auc/f1 ...) by round.

    ``None`` if no round has a central evaluation.
    """
    rounds = [r for r in results["rounds"] if r.get("metrics")]
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rounds[-1]["metrics"])
    kind = (results.get("task") or {}).get("kind", "multiclass")
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        points = [(r["round"], r["metrics"][name]) for r in rounds if name in r["metrics"]]
        ax.plot(*zip(*points, strict=True), marker="o", label="global (pooled test)")
        fed = [
            (r["round"], r["federated"][f"eval-{name}"])
            for r in rounds
            if f"eval-{name}" in r.get("federated", {})
        ]
        if fed:
            ax.plot(*zip(*fed, strict=True), linestyle="--", label="federated (site-weighted)")
        ax.set(xlabel="round", ylabel=name, title=f"{kind}: {name}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy(results: dict[str, Any], path: Path) -> Path | None:
    """Global accuracy and loss per round; ``None`` if no round has a central evaluation."""
    rounds = [r for r in results["rounds"] if r.get("accuracy") is not None]
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["round"] for r in rounds]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(x, [r["accuracy"] for r in rounds], marker="o", label="global (pooled test)")
    fed = [(r["round"], r["federated"].get("eval-accuracy")) for r in rounds if r.get("federated")]
    if fed:
        ax_acc.plot(*zip(*fed, strict=True), linestyle="--", label="federated (site-weighted)")
    ax_acc.set(xlabel="round", ylabel="accuracy", title="Global model accuracy", ylim=(0, 1))
    ax_acc.legend()
    ax_loss.plot(x, [r["loss"] for r in rounds], marker="o", color="tab:red")
    loss_name = (results.get("task") or {}).get("loss", "cross-entropy")
    ax_loss.set(xlabel="round", ylabel=loss_name, title="Global model loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
