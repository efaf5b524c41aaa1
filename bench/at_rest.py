"""Cost of encryption at rest: plaintext vs encrypted state, side by side in one run.

Measures, interleaved plaintext/encrypted/plaintext/... so machine noise hits both alike:

* ModelStore publish (verify + write + fsync + switch CURRENT) and load (read, decrypt,
  verify the SHA-256, parse safetensors) of a small and a larger model;
* audit log append throughput (one record per ``write``: the slowest path; under load the
  server batches a loop iteration's lines into one ``write``) and ``audit summary`` reads;
* one privacy-ledger charge (locked read-modify-write, dominated by the accountant).

    python bench/at_rest.py            # -> bench/results/at_rest.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedinfer.artifacts import ModelStore, weights_from_module, write_artifact
from fedinfer.config.schema import ModelConfig
from fedinfer.crypto import StateKey
from fedinfer.models import build_model
from fedinfer.privacy import PrivacyLedger
from fedinfer.serving.audit import AuditLog, summarize_audit

MODELS = {
    "mlp 40-32-16-10 (3 KB)": [32, 16],
    "mlp 40-2048x3-10 (34 MB)": [2048, 2048, 2048],
}
RECORD = {
    "ts": "2025-01-01T00:00:00.000+00:00",
    "request_id": "4f1c2a9e0b7d4e2f",
    "principal": "hospital-a-analyst",
    "endpoint": "infer",
    "model": "cnn1d",
    "version": 7,
    "rows": 16,
    "batch_size": 64,
    "latency_ms": 1.73,
    "status": 200,
}


def _artifacts(work: Path, signing_key: Ed25519PrivateKey, hidden: list[int], n: int) -> list[Path]:
    cfg = ModelConfig(name="mlp", hidden_sizes=hidden)
    weights = weights_from_module(build_model(cfg, input_dim=40, num_classes=10))
    return [
        write_artifact(
            work / f"art-{v}",
            weights=weights,
            model_cfg=cfg,
            input_dim=40,
            num_classes=10,
            version=v,
            server_round=v,
            metrics={},
            privacy={},
            run_id="bench",
            signing_key=signing_key,
        )
        for v in range(1, n + 1)
    ]


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def bench_store(
    work: Path, keys: dict[str, StateKey | None], repeat: int
) -> list[tuple[str, str, float, float]]:
    signing_key = Ed25519PrivateKey.generate()
    rows = []
    for label, hidden in MODELS.items():
        arts = _artifacts(work / label.split()[1], signing_key, hidden, repeat)
        publish: dict[str, list[float]] = {mode: [] for mode in keys}
        load: dict[str, list[float]] = {mode: [] for mode in keys}
        stores = {
            mode: ModelStore(work / f"store-{mode}-{len(rows)}", key=k, keep=repeat + 1)
            for mode, k in keys.items()
        }
        for art in arts:
            for mode, store in stores.items():  # interleaved
                t0 = time.perf_counter()
                store.publish(art, public_key=signing_key.public_key())
                publish[mode].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                store.load(public_key=signing_key.public_key())
                load[mode].append(time.perf_counter() - t0)
        for mode in keys:
            rows.append((label, mode, _median_ms(publish[mode]), _median_ms(load[mode])))
    return rows


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_audit(
    work: Path, keys: dict[str, StateKey | None], records: int, repeat: int
) -> list[tuple[str, float, float, float]]:
    write_s: dict[str, list[float]] = {mode: [] for mode in keys}
    read_s: dict[str, list[float]] = {mode: [] for mode in keys}
    size: dict[str, float] = {}
    for i in range(repeat):
        for mode, key in keys.items():
            directory = work / f"audit-{mode}-{i}"

            def append(directory: Path = directory, key: StateKey | None = key) -> None:
                log = AuditLog(directory, key=key)
                for _ in range(records):
                    log.write(RECORD)
                log.close()

            write_s[mode].append(_timed(append))
            read_s[mode].append(_timed(lambda d=directory, k=key: summarize_audit(d, key=k)))
            size[mode] = sum(p.stat().st_size for p in directory.glob("audit*.jsonl")) / records
    return [
        (
            mode,
            records / statistics.median(write_s[mode]),
            records / statistics.median(read_s[mode]),
            size[mode],
        )
        for mode in keys
    ]


def bench_ledger(work: Path, keys: dict[str, StateKey | None], repeat: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {mode: [] for mode in keys}
    ledgers = {
        mode: PrivacyLedger.open(
            work / f"ledger-{mode}", accountant="rdp", delta=1e-5, num_samples=1000, key=key
        )
        for mode, key in keys.items()
    }
    for r in range(repeat):
        for mode, ledger in ledgers.items():
            samples[mode].append(
                _timed(
                    lambda led=ledger, r=r: led.charge(
                        server_round=r, run_id="b", noise_multiplier=1.1, sample_rate=0.01, steps=10
                    )
                )
            )
    return {mode: _median_ms(s) for mode, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7, help="publishes/loads per model and mode")
    parser.add_argument("--records", type=int, default=20000, help="audit records per run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/at_rest.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedinfer-bench-at-rest-") as tmp:
        work = Path(tmp)
        keys: dict[str, StateKey | None] = {"plaintext": None, "encrypted": StateKey.generate()}
        store_rows = bench_store(work, keys, args.repeat)
        audit_rows = bench_audit(work, keys, args.records, 3)
        ledger = bench_ledger(work, keys, args.repeat)
    lines = [
        "# Encryption at rest: cost (plaintext vs encrypted, same run, interleaved)",
        "",
        f"`python bench/at_rest.py --repeat {args.repeat} --records {args.records}` on "
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.python_version()}; "
        "ChaCha20-Poly1305 from `cryptography`. Medians.",
        "",
        "## ModelStore (publish includes fsyncs; load re-checks the SHA-256 every time)",
        "",
        "| model | state | publish ms | load ms |",
        "|---|---|---:|---:|",
        *[f"| {m} | {mode} | {p:.2f} | {ld:.2f} |" for m, mode, p, ld in store_rows],
        "",
        "## Audit log (one record per write; the server batches a loop iteration per write)",
        "",
        "| state | append records/s | summary records/s | bytes/record on disk |",
        "|---|---:|---:|---:|",
        *[f"| {mode} | {w:,.0f} | {r:,.0f} | {b:.0f} |" for mode, w, r, b in audit_rows],
        "",
        "## Privacy ledger",
        "",
        "| state | one charge ms |",
        "|---|---:|",
        *[f"| {mode} | {ms:.2f} |" for mode, ms in ledger.items()],
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
