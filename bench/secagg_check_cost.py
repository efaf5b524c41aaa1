"""Protocol cost of one secure-aggregation round, old vs new code, side by side.

Runs the same in-process round (n sites, a cnn1d-sized update, every message through its
wire form, every site rebuilt from its serialized state) under two source trees, in
alternating subprocesses so that machine noise hits both alike, and reports the median
per-round CPU time of the protocol alone (no training) and the count of exchanges:

    python bench/secagg_check_cost.py --old /path/to/tree-before --new . --sites 10

With every site uploading, the new code signs the full survivor list with the upload and
checks n signatures per site before unmasking (no extra exchange); with one site dropped
it adds the consistency exchange (one more signature per survivor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
import numpy as np
from fedinfer.secagg import ServerSecAgg, SiteSecAgg, resolve_threshold

def wire(m):
    return type(m).from_wire(m.to_wire())

n, dim, drop, reps = (int(a) for a in sys.argv[1:5])
rng = np.random.default_rng(0)
ids = list(range(1, n + 1))
updates = {i: rng.normal(scale=0.3, size=dim).astype(np.float32) for i in ids}
times, exchanges = [], 0
for rep in range(reps):
    states = {i: SiteSecAgg.create(i).to_state() for i in ids}
    directory = {i: wire(SiteSecAgg.from_state(s).setup_reply()).public_keys
                 for i, s in states.items()}
    def agent(i):
        try:
            return SiteSecAgg.from_state(states[i], min_threshold_fraction=0.5)
        except TypeError:
            return SiteSecAgg.from_state(states[i])
    start = time.process_time()
    server = ServerSecAgg(run_id=1, server_round=1, participants=directory,
                          threshold=resolve_threshold(0.6, num_sites=n), dim=dim,
                          clip_range=1.0, bits=16)
    for i in ids[drop:]:
        a = agent(i)
        server.receive_upload(wire(a.mask_update(wire(server.config), updates[i], weight=100)))
        states[i] = a.to_state()
    exchanges = 2
    if hasattr(server, "consistency_requests"):
        checks = server.consistency_requests()
        exchanges += bool(checks)
        for i, request in checks.items():
            a = agent(i)
            server.receive_consistency_reply(wire(a.sign_survivors(wire(request))))
            states[i] = a.to_state()
    for i, request in server.unmask_requests().items():
        a = agent(i)
        server.receive_unmask_reply(wire(a.unmask(wire(request))))
        states[i] = a.to_state()
    server.finalize()
    times.append(time.process_time() - start)
print(json.dumps({"times": times, "exchanges": exchanges}))
"""


def child(tree: Path, sites: int, dim: int, drop: int, reps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    args = [sys.executable, "-c", _CHILD, str(sites), str(dim), str(drop), str(reps)]
    out = subprocess.run(
        args, env=env, cwd=tree, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=Path("."))
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--dim", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    report = {}
    started = time.time()
    for drop in (0, 1):
        times: dict[str, list[float]] = {"old": [], "new": []}
        exchanges = {}
        for _ in range(args.repeat):
            for name, tree in (("old", args.old), ("new", args.new)):
                result = child(tree, args.sites, args.dim, drop, args.reps)
                times[name] += result["times"]
                exchanges[name] = result["exchanges"]
        old, new = statistics.median(times["old"]), statistics.median(times["new"])
        report["no dropout" if drop == 0 else "one site dropped"] = {
            "median_round_cpu_s": {"old": round(old, 4), "new": round(new, 4)},
            "ratio_new_over_old": round(new / old, 3),
            "exchanges_after_train": {k: v - 1 for k, v in exchanges.items()},
        }
    report["setup"] = {"sites": args.sites, "dim": args.dim, "rounds_each": args.reps * args.repeat,
                       "wall_s": round(time.time() - started, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
