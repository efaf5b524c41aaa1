"""A site's memory and speed on on-disk data read lazily vs loaded -> bench/results/lazy_data.md.

One site trains one local epoch of DP-SGD (Opacus, Poisson sampling, logreg) on synthetic
tabular data of N rows x 512 float32 features, for two sizes N that differ 8x, three ways:

* ``memory``: the NPZ shards loaded into one array (what ``dataset=csv`` does with a file);
* ``shards``: the same uncompressed NPZ shards read lazily (memory-mapped rows, fedinfer.data.lazy);
* ``shards+1w``: the same with one DataLoader worker (``dataset.num_workers=1``).

Each run is a fresh subprocess. Reported: peak anonymous memory of the training process
(``RssAnon``, sampled every step: the memory the site cannot give back; memory-mapped file pages
are page cache, which the kernel reclaims), wall time of the epoch, and rows per second.

    python bench/lazy_data.py          # ~5 min on 2 cores, writes ~1 GB under $TMPDIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMAND = "python bench/lazy_data.py"
FEATURES = 512
ROWS_PER_SHARD = 25_000
BATCH = 256


def write_data(root: Path, rows: int) -> Path:
    """Uncompressed NPZ shards of ``rows`` synthetic samples (10 linearly separable-ish classes)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, FEATURES)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        n = min(ROWS_PER_SHARD, rows - start)
        y = rng.integers(0, 10, size=n)
        x = centers[y] + rng.normal(scale=2.0, size=(n, FEATURES)).astype(np.float32)
        np.savez(root / f"shard-{k:04d}.npz", x=x.astype(np.float32), y=y)
    return root


def _rss_anon_mb(pid: str = "self") -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # a worker that just exited
        return 0.0
    for line in status.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _tree_anon_mb() -> float:
    """RssAnon of this process plus its children (DataLoader workers)."""
    children = []
    for task in Path("/proc/self/task").iterdir():
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue
    return _rss_anon_mb() + sum(_rss_anon_mb(pid) for pid in children)


def child(root: Path, mode: str) -> dict:
    """One local DP-SGD epoch in this process; returns the measurements."""
    import torch

    from fedinfer.config.schema import ModelConfig
    from fedinfer.data import ArrayDataset, open_shards
    from fedinfer.models import build_model
    from fedinfer.privacy import make_private
    from fedinfer.training import make_loader

    torch.set_num_threads(1)
    base = _rss_anon_mb()
    started = time.perf_counter()
    if mode == "memory":
        parts = [np.load(p, allow_pickle=False) for p in sorted(root.glob("*.npz"))]
        data = ArrayDataset(
            np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts]), 10
        )
        del parts
    else:
        data = open_shards(root)
    loaded = time.perf_counter() - started
    model = build_model(ModelConfig(name="logreg"), input_dim=FEATURES, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = make_loader(data, batch_size=BATCH, shuffle=True, seed=0,
                         num_workers=1 if mode.endswith("1w") else 0)  # fmt: skip
    private = make_private(model=model, optimizer=optimizer, data_loader=loader,
                           noise_multiplier=1.0, max_grad_norm=1.0)  # fmt: skip
    t0 = time.perf_counter()
    read_only = sum(len(y) for _, y in private.data_loader)  # the data path alone: one pass
    read_s = time.perf_counter() - t0
    peak, rows, correct = _tree_anon_mb(), 0, 0
    t0 = time.perf_counter()
    for x, y in private.data_loader:
        private.optimizer.zero_grad(set_to_none=True)
        logits = private.model(x)
        torch.nn.functional.cross_entropy(logits, y).backward() if len(y) else None
        private.optimizer.step()
        rows += len(y)
        correct += int((logits.argmax(1) == y).sum())
        peak = max(peak, _tree_anon_mb())
    epoch = time.perf_counter() - t0
    return {"mode": mode, "rows": len(data), "open_s": loaded, "epoch_s": epoch,
            "read_rows_per_s": read_only / read_s,
            "rows_per_s": rows / epoch, "peak_anon_mb": peak, "base_anon_mb": base,
            "train_acc": correct / max(rows, 1), "sample_rate": private.sample_rate}  # fmt: skip


def write_report(path: Path, results: list[dict], meta: dict) -> None:
    lines = [
        "# On-disk data read lazily vs loaded into memory (one site, one DP-SGD epoch)",
        "",
        f"Command: `{COMMAND}` (from the repository root; writes this file).",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}; load average {meta['load_start']} at start, "
        f"{meta['load_end']} at end (a SHARED box). Data: synthetic, {FEATURES} float32 features, "
        f"10 classes, uncompressed NPZ shards of {ROWS_PER_SHARD:,} rows; logreg, batch {BATCH}, "
        "Opacus Poisson sampling, one torch thread. Each row of the table is a fresh process.",
        "",
        "| rows (on disk) | mode | peak RssAnon MB | open s | loader alone rows/s | "
        "DP-SGD epoch s | rows/s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        size = r["rows"] * FEATURES * 4 / 2**20
        lines.append(
            f"| {r['rows']:,} ({size:,.0f} MB) | {r['mode']} | {r['peak_anon_mb']:,.0f} | "
            f"{r['open_s']:.2f} | {r['read_rows_per_s']:,.0f} | {r['epoch_s']:.1f} | "
            f"{r['rows_per_s']:,.0f} |"
        )
    lines += [
        "",
        "RssAnon is anonymous resident memory (heap, tensors) of the training process plus its "
        "DataLoader workers, sampled after every step; it excludes memory-mapped file pages, "
        "which are page cache the kernel can drop. About 250 MB of it is torch + Opacus + "
        "fedinfer imported before any data is opened. With a worker (a forked process) the "
        "pages it shares copy-on-write with the trainer are counted twice.",
        "",
        "\"loader alone\": one pass of the Poisson-sampling DataLoader without training (a "
        "batch is one sorted gather per shard, `LazyDataset.__getitems__`); the epoch column "
        "includes Opacus' per-sample gradients and noise, which dominate here.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 400_000])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lazy_data.md")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1])))
        return
    meta = {"load_start": round(os.getloadavg()[0], 1)}
    tmp = Path(tempfile.mkdtemp(prefix="fedinfer-lazy-"))
    results = []
    try:
        for rows in args.rows:
            root = write_data(tmp / f"rows-{rows}", rows)
            for mode in ("memory", "shards", "shards+1w"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(root), mode],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["load_end"] = round(os.getloadavg()[0], 1)
    write_report(args.out, results, meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
