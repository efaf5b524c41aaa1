"""``results.json`` and ``accuracy.png`` of a run, written atomically after every round."""

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
        }

    def add_round(self, record: dict[str, Any], *, elapsed_s: float) -> None:
        """Append one round and persist."""
        self.data["rounds"].append(record)
        self.data["elapsed_s"] = elapsed_s
        self.data["max_epsilon"] = max(
            (e for r in self.data["rounds"] for e in r.get("epsilon", {}).values()), default=None
        )
        self._save()

    def finish(self, *, status: str, **fields: Any) -> None:
        """Record the outcome (``completed``, ``stopped``, ``failed``) and persist."""
        self.data["status"] = status
        rounds = self.data["rounds"]
        accuracies = [r["accuracy"] for r in rounds if r.get("accuracy") is not None]
        self.data["final_accuracy"] = accuracies[-1] if accuracies else None
        self.data["best_accuracy"] = max(accuracies, default=None)
        self.data.update(fields)
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.path, self.data)


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
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Global model loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
