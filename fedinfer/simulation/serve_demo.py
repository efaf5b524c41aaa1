"""The end of the main job: every site serves the final global model and answers a request.

Each simulated site starts its own inference server (a separate process, as in a
deployment) on its own ModelStore, then is sent a real Open Inference Protocol
request with rows of its *local* test split over loopback HTTP.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from fedinfer.artifacts import ModelStore
from fedinfer.config.schema import FedInferConfig
from fedinfer.crypto.at_rest import resolve_state_key
from fedinfer.data import build_federated_data
from fedinfer.errors import ServingError
from fedinfer.reporting.text import log_to_file, plural
from fedinfer.serving.launch import SiteServer
from fedinfer.tasks import compute_metrics, task_spec

__all__ = ["SiteAnswer", "query_site", "site_servers"]

_DEMO_ROWS = 32


@dataclass(frozen=True)
class SiteAnswer:
    """One site's answer to the demo request."""

    site_id: str
    url: str
    model_version: str
    rows: int
    accuracy: float
    """The task's headline metric (``metric``): accuracy, or RMSE for regression."""
    latency_ms: float
    metric: str = "accuracy"


def query_site(
    url: str,
    model_name: str,
    x: np.ndarray,
    y: np.ndarray,
    site_id: str,
    *,
    task: str = "multiclass",
    threshold: float = 0.5,
) -> SiteAnswer:
    """Send ``x`` to a site's server (OIP JSON) and score the answer against ``y``."""
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    started = time.perf_counter()
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        response = client.post(f"{url}/v2/models/{model_name}/infer", json=body)
    latency = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise ServingError(f"site {site_id} answered {response.status_code}: {response.text[:300]}")
    doc = response.json()
    raw = np.asarray(doc["outputs"][0]["data"], dtype=np.float32).reshape(len(y), -1)
    headline = task_spec(task).headline  # outputs[0]: the logits, or a regression's values
    return SiteAnswer(
        site_id,
        url,
        str(doc.get("model_version")),
        len(y),
        compute_metrics(task, y, raw, threshold=threshold)[headline],
        latency,
        headline,
    )


@contextlib.contextmanager
def site_servers(
    cfg: FedInferConfig, *, output_dir: Path, console: Console
) -> Iterator[list[SiteAnswer]]:
    """Start every site's server on its model store, query each once, print a table.

    Yields the answers while the servers run; they stop when the block ends.
    """
    data = {s.site_id: s for s in build_federated_data(cfg).sites}
    public_key = output_dir / "coordinator" / "signing.pub"
    servers: dict[str, SiteServer] = {}
    for site_id in sorted(data):
        store = output_dir / "sites" / site_id / "models"
        key = resolve_state_key(None, protects=[store])  # $FEDINFER_STATE_KEY_FILE, as the sites
        if ModelStore(store, key=key).current_version() is None:
            console.print(f"[yellow]site {site_id} holds no model; it does not serve[/]")
            continue
        servers[site_id] = SiteServer(
            store,
            backend=cfg.serving.backend,
            public_key=public_key,
            max_batch_size=cfg.serving.max_batch_size,
            max_queue_delay_ms=cfg.serving.max_queue_delay_ms,
            workers=cfg.serving.workers,
            port=cfg.serving.base_port + len(servers) if cfg.serving.base_port else 0,
        )
    if not servers:
        yield []
        return
    console.print(f"Starting {plural(len(servers), 'site inference server')} ...")
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda s: stack.enter_context(s), servers.values()))
        answers = [
            query_site(
                server.url,
                cfg.model.name,
                data[site].test.x[:_DEMO_ROWS],
                data[site].test.y[:_DEMO_ROWS],
                site,
                task=cfg.task.kind,
                threshold=cfg.task.threshold,
            )
            for site, server in servers.items()
        ]
        _print_answers(console, answers)
        yield answers


def _print_answers(console: Console, answers: list[SiteAnswer]) -> None:
    # No endpoint column: unless serving.keep_alive, the servers stop right after this table.
    table = Table(title="Every site serves the global model (Open Inference Protocol over HTTP)")
    metric = answers[0].metric if answers else "accuracy"
    for column in ("site", "model version", "rows", metric, "latency ms"):
        table.add_column(column, no_wrap=True)
    for a in answers:
        table.add_row(
            a.site_id, a.model_version, str(a.rows), f"{a.accuracy:.3f}", f"{a.latency_ms:.1f}"
        )
    console.print(table)
    log_to_file(
        "demo requests: "
        + "; ".join(f"{a.site_id} v{a.model_version} {a.metric} {a.accuracy:.3f}" for a in answers)
    )
