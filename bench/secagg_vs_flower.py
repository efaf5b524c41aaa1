"""Benchmark fedinfer's secure aggregation against Flower's SecAgg+ on the same inputs.

Both protocols run in one process, every party in turn, calling each protocol's own code the
way its stages do: ours through ``fedinfer.secagg`` (including the wire conversions and the
site state round trip through ``Context.state``-style dicts); Flower's by replaying the
stage bodies of ``flwr.client.mod.secure_aggregation.secaggplus_mod`` and
``flwr.server.workflow.secure_aggregation.secaggplus_workflow`` with the helpers of
``flwr.common.secure_aggregation`` (only the Message/Grid plumbing is left out). Flower runs
with ``num_shares = n`` (every site is every site's neighbour), the same pairwise graph as
ours, and the same threshold.

CPU time is ``time.process_time`` (all threads of the process, so Flower's thread-pooled
Shamir counts) around each party's protocol calls. Every aggregate is checked against the
plain weighted mean of the surviving sites' updates, within each protocol's error bound.

Usage::

    python bench/secagg_vs_flower.py                 # full grid, writes bench/results/...
    python bench/secagg_vs_flower.py --quick         # seconds-long smoke run, prints only
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedinfer.secagg import (
    ConsistencyReply,
    ConsistencyRequest,
    MaskedUpload,
    RoundConfig,
    ServerSecAgg,
    SetupReply,
    SiteSecAgg,
    UnmaskReply,
    UnmaskRequest,
    quantization_bound,
    resolve_threshold,
)

CLIP_RANGE = 1.0
BITS = 16  # ours: 2**16 - 1 levels on [-c, c]
FLOWER_QUANTIZATION_RANGE = 2**16  # Flower: 2**16 levels on [-c, c], the same resolution
FLOWER_MODULUS_RANGE = 2**32  # Flower's default
MAX_WEIGHT = 1000  # Flower's max_weight; weights are drawn in [100, 1000]
THRESHOLD_FRACTION = 0.6


SETTINGS = f"""\
Settings: clip range {CLIP_RANGE}; ours {BITS} bits (2^{BITS}-1 levels), Flower
quantization_range 2^16 (the same resolution), modulus 2^32, max_weight {MAX_WEIGHT};
threshold = ceil({THRESHOLD_FRACTION} n) for both; Flower num_shares = n (full graph, like
ours). Updates uniform in [-0.5, 0.5] (float32), weights uniform in [100, 1000]. One round,
every party in one process, after an untimed warm-up; CPU = time.process_time around each
party's protocol calls (ours includes the wire and site-state (de)serialization). Dropped
sites received the keys and died before uploading; their masks are removed in the unmask
step. Flower's site CPU includes its key generation and key sharing, which SecAgg+ repeats
every round (4 message exchanges per round, against our 2 after a one-time set-up). The
machine's 2 cores are shared with other work, so single numbers carry noise of tens of
percent. Flower's speed comes partly from its mask PRG, numpy's RandomState seeded with 32
bits, which a curious coordinator can brute-force (why we do not use it); ours expands
masks with AES-256-CTR."""

ACCURACY = """\
Both aggregates match the plain weighted mean within each protocol's bound (asserted). Ours:
deterministic rounding, bound clip/(2^bits-2) per coordinate. Flower: stochastic rounding of
weight-scaled values, bound n(2c/Q + max|u|/Q)/sum(r_i), r_i the rounded weight ratios."""


@dataclass(frozen=True)
class Case:
    n: int
    d: int
    drop_fraction: float
    seed: int = 0

    def inputs(self) -> tuple[list[int], dict[int, np.ndarray], dict[int, int], list[int]]:
        rng = np.random.default_rng(self.seed)
        ids = sorted({int(i) for i in rng.integers(1, 2**63, size=self.n)})
        updates = {
            i: rng.uniform(-0.5, 0.5, size=self.d).astype(np.float32) for i in ids
        }  # inside the clip range, so both protocols' clipping is a no-op
        weights = {i: int(rng.integers(100, MAX_WEIGHT + 1)) for i in ids}
        dropped = ids[: round(self.drop_fraction * self.n)]
        return ids, updates, weights, dropped


@dataclass
class Measurement:
    protocol: str
    exchanges: int
    site_setup_s: float  # mean per site, once per run
    site_round_s: float  # mean per surviving site, per round
    server_round_s: float  # coordinator, per round
    max_error: float
    bound: float
    wall_s: float


class CpuClock:
    """Accumulates process CPU time per party."""

    def __init__(self) -> None:
        self.seconds: dict[Any, float] = defaultdict(float)

    @contextmanager
    def __call__(self, party: Any) -> Iterator[None]:
        start = time.process_time()
        try:
            yield
        finally:
            self.seconds[party] += time.process_time() - start


def plain_mean(
    updates: dict[int, np.ndarray], weights: dict[int, int], sites: list[int]
) -> np.ndarray:
    total = sum(weights[i] for i in sites)
    clipped = {i: np.clip(updates[i].astype(np.float64), -CLIP_RANGE, CLIP_RANGE) for i in sites}
    return sum(weights[i] * clipped[i] for i in sites) / total


# --- ours -------------------------------------------------------------------------------------


def run_fedinfer(case: Case) -> Measurement:
    ids, updates, weights, dropped = case.inputs()
    survivors = [i for i in ids if i not in dropped]
    threshold = resolve_threshold(THRESHOLD_FRACTION, num_sites=case.n)
    setup_clock, round_clock = CpuClock(), CpuClock()
    wall = time.perf_counter()

    # Set-up, once per run: each site draws keys; the coordinator keeps the directory.
    states: dict[int, dict[str, Any]] = {}
    setup_wire: dict[int, dict[str, Any]] = {}
    for i in ids:
        with setup_clock(i):
            site = SiteSecAgg.create(i)
            setup_wire[i] = site.setup_reply().to_wire()
            states[i] = site.to_state()
    with setup_clock("server"):
        directory = {i: SetupReply.from_wire(w).public_keys for i, w in setup_wire.items()}

    # Exchange 1: round config out with the train message, masked uploads back.
    with round_clock("server"):
        server = ServerSecAgg(
            run_id=1,
            server_round=1,
            participants=directory,
            threshold=threshold,
            dim=case.d,
            clip_range=CLIP_RANGE,
            bits=BITS,
        )
        config_wire = server.config.to_wire()
    for i in survivors:  # dropped sites got the config and keys, then died before uploading
        with round_clock(i):
            site = SiteSecAgg.from_state(states[i])
            upload_wire = site.mask_update(
                RoundConfig.from_wire(config_wire), updates[i], weight=weights[i]
            ).to_wire()
            states[i] = site.to_state()
        with round_clock("server"):
            server.receive_upload(MaskedUpload.from_wire(upload_wire))

    # Consistency check, only when a participant dropped: survivors sign the survivor list.
    with round_clock("server"):
        checks = {i: r.to_wire() for i, r in server.consistency_requests().items()}
    for i, check in checks.items():
        with round_clock(i):
            site = SiteSecAgg.from_state(states[i])
            signed = site.sign_survivors(ConsistencyRequest.from_wire(check)).to_wire()
            states[i] = site.to_state()
        with round_clock("server"):
            server.receive_consistency_reply(ConsistencyReply.from_wire(signed))

    # Exchange 2: unmask.
    with round_clock("server"):
        requests = {i: r.to_wire() for i, r in server.unmask_requests().items()}
    for i in survivors:
        with round_clock(i):
            site = SiteSecAgg.from_state(states[i])
            reply_wire = site.unmask(UnmaskRequest.from_wire(requests[i])).to_wire()
            states[i] = site.to_state()
        with round_clock("server"):
            server.receive_unmask_reply(UnmaskReply.from_wire(reply_wire))
    with round_clock("server"):
        result = server.finalize()
    wall = time.perf_counter() - wall

    assert result.total_weight == sum(weights[i] for i in survivors)
    error = float(np.max(np.abs(result.mean_update - plain_mean(updates, weights, survivors))))
    bound = quantization_bound(CLIP_RANGE, BITS)
    assert error <= bound * (1 + 1e-9), (error, bound)
    return Measurement(
        protocol="fedinfer",
        exchanges=2 + bool(checks),
        site_setup_s=float(np.mean([setup_clock.seconds[i] for i in ids])),
        site_round_s=float(np.mean([round_clock.seconds[i] for i in survivors])),
        server_round_s=round_clock.seconds["server"],
        max_error=error,
        bound=bound,
        wall_s=wall,
    )


# --- Flower's SecAgg+ -------------------------------------------------------------------------


def run_flower(case: Case) -> Measurement:
    # Imported here so that `--help` and our own runs never pay for Flower's import.
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        decrypt,
        encrypt,
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen,
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    ids, updates, weights, dropped = case.inputs()
    survivors = [i for i in ids if i not in dropped]
    n = case.n
    threshold = resolve_threshold(THRESHOLD_FRACTION, num_sites=n)
    num_shares = n
    q_range, mod_range = FLOWER_QUANTIZATION_RANGE, FLOWER_MODULUS_RANGE
    clock = CpuClock()
    np.random.seed(case.seed)  # Flower's stochastic rounding draws from the global RNG
    wall = time.perf_counter()

    class Site:  # the per-node state of secaggplus_mod.SecAggPlusState
        def __init__(self, nid: int) -> None:
            self.nid = nid
            self.rd_seed_share: dict[int, bytes] = {}
            self.sk1_share: dict[int, bytes] = {}
            self.ss2: dict[int, bytes] = {}

        def setup(self) -> tuple[bytes, bytes]:  # secaggplus_mod._setup
            sk1, pk1 = generate_key_pairs()
            sk2, pk2 = generate_key_pairs()
            self.sk1, self.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
            self.sk2, self.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
            return self.pk1, self.pk2

        def share_keys(self, keys: dict[int, tuple[bytes, bytes]]) -> tuple[list[int], list[bytes]]:
            self.keys = keys  # secaggplus_mod._share_keys
            pks = [k for pair in keys.values() for k in pair]
            assert len(keys) >= threshold and len(set(pks)) == len(pks)
            self.rd_seed = os.urandom(32)
            b_shares = create_shares(self.rd_seed, threshold, num_shares)
            sk1_shares = create_shares(self.sk1, threshold, num_shares)
            dsts, ciphertexts = [], []
            for idx, (nid, (_, pk2)) in enumerate(keys.items()):
                if nid == self.nid:
                    self.rd_seed_share[nid], self.sk1_share[nid] = b_shares[idx], sk1_shares[idx]
                else:
                    key = generate_shared_key(
                        bytes_to_private_key(self.sk2), bytes_to_public_key(pk2)
                    )
                    self.ss2[nid] = key
                    plaintext = share_keys_plaintext_concat(
                        self.nid, nid, b_shares[idx], sk1_shares[idx]
                    )
                    dsts.append(nid)
                    ciphertexts.append(encrypt(key, plaintext))
            return dsts, ciphertexts

        def collect_masked(
            self, srcs: list[int], ciphertexts: list[bytes], update: np.ndarray, num_examples: int
        ) -> list[bytes]:
            assert len(ciphertexts) + 1 >= threshold  # secaggplus_mod._collect_masked_vectors
            available = []
            for src, ciphertext in zip(srcs, ciphertexts, strict=True):
                actual, dst, b_share, sk1_share = share_keys_plaintext_separate(
                    decrypt(self.ss2[src], ciphertext)
                )
                assert actual == src and dst == self.nid
                available.append(src)
                self.rd_seed_share[src], self.sk1_share[src] = b_share, sk1_share
            q_ratio = round(num_examples / MAX_WEIGHT * q_range)
            params = parameters_multiply([update], q_ratio / q_range)
            quantized = factor_combine(q_ratio, quantize(params, CLIP_RANGE, q_range))
            dims = [a.shape for a in quantized]
            quantized = parameters_addition(
                quantized, pseudo_rand_gen(self.rd_seed, mod_range, dims)
            )
            for nid in available:
                key = generate_shared_key(
                    bytes_to_private_key(self.sk1), bytes_to_public_key(self.keys[nid][0])
                )
                mask = pseudo_rand_gen(key, mod_range, dims)
                quantized = (parameters_addition if self.nid > nid else parameters_subtraction)(
                    quantized, mask
                )
            return [ndarray_to_bytes(a) for a in parameters_mod(quantized, mod_range)]

        def unmask(self, active: list[int], dead: list[int]) -> tuple[list[int], list[bytes]]:
            assert len(active) >= threshold  # secaggplus_mod._unmask
            shares = [self.rd_seed_share[i] for i in active] + [self.sk1_share[i] for i in dead]
            return active + dead, shares

    sites = {i: Site(i) for i in ids}
    # Stage 0 (setup) -- every round in SecAgg+.
    public_keys = {}
    for i in ids:
        with clock(i):
            public_keys[i] = sites[i].setup()
    # Stage 1 (share keys): the server forwards every site's key list, then routes ciphertexts.
    forward: dict[int, tuple[list[int], list[bytes]]] = {i: ([], []) for i in ids}
    for i in ids:
        with clock(i):
            dsts, cts = sites[i].share_keys(dict(public_keys))
        with clock("server"):
            for dst, ct in zip(dsts, cts, strict=True):
                forward[dst][0].append(i)
                forward[dst][1].append(ct)
    # Stage 2 (collect masked vectors): `dropped` die here, after sharing their keys.
    masked_sum = None
    for i in survivors:
        with clock(i):
            blobs = sites[i].collect_masked(*forward[i], updates[i], weights[i])
        with clock("server"):
            vec = [bytes_to_ndarray(b) for b in blobs]
            masked_sum = vec if masked_sum is None else parameters_addition(masked_sum, vec)
    with clock("server"):
        masked_sum = parameters_mod(masked_sum, mod_range)
    # Stage 3 (unmask).
    collected: dict[int, list[bytes]] = {i: [] for i in ids}
    for i in survivors:
        with clock(i):
            nids, shares = sites[i].unmask(survivors, dropped)
        with clock("server"):
            for owner, share in zip(nids, shares, strict=True):
                collected[owner].append(share)
    with clock("server"):  # secaggplus_workflow.unmask_stage
        for nid, share_list in collected.items():
            assert len(share_list) >= threshold
            secret = combine_shares(share_list)
            if nid in survivors:
                mask = pseudo_rand_gen(secret, mod_range, get_parameters_shape(masked_sum))
                masked_sum = parameters_subtraction(masked_sum, mask)
            else:
                for neighbour in (j for j in ids if j != nid):
                    key = generate_shared_key(
                        bytes_to_private_key(secret), bytes_to_public_key(public_keys[neighbour][0])
                    )
                    mask = pseudo_rand_gen(key, mod_range, get_parameters_shape(masked_sum))
                    masked_sum = (
                        parameters_addition if nid > neighbour else parameters_subtraction
                    )(masked_sum, mask)
        recon = parameters_mod(masked_sum, mod_range)
        q_total_ratio, recon = factor_extract(recon)
        aggregated = dequantize(recon, CLIP_RANGE, q_range)
        aggregated[0] += -(len(survivors) - 1) * CLIP_RANGE
        aggregated[0] *= q_range / q_total_ratio
    wall = time.perf_counter() - wall

    error = float(np.max(np.abs(aggregated[0] - plain_mean(updates, weights, survivors))))
    # Stochastic rounding moves each site's value by < 1 step (2c/Q); the weights are rounded
    # to 1/Q of max_weight. Dividing by sum(r_i) = q_total/Q gives the bound on the mean.
    ratio_sum = q_total_ratio / q_range
    max_abs = max(float(np.max(np.abs(updates[i]))) for i in survivors)
    bound = (len(survivors) * (2 * CLIP_RANGE / q_range + max_abs / q_range)) / ratio_sum
    assert error <= bound, (error, bound)
    return Measurement(
        protocol="Flower SecAgg+",
        exchanges=4,
        site_setup_s=0.0,  # SecAgg+ has no per-run set-up: stage 0 runs every round
        site_round_s=float(np.mean([clock.seconds[i] for i in survivors])),
        server_round_s=clock.seconds["server"],
        max_error=error,
        bound=bound,
        wall_s=wall,
    )


# --- report ----------------------------------------------------------------------------------


def grid(quick: bool) -> list[Case]:
    if quick:
        return [Case(n=5, d=1_000, drop_fraction=0.0), Case(n=5, d=1_000, drop_fraction=0.2)]
    cases = [Case(n=n, d=d, drop_fraction=0.0) for n in (10, 50) for d in (10**4, 10**5, 10**6)]
    return cases + [Case(n=n, d=10**5, drop_fraction=0.1) for n in (10, 50)]


def versions() -> str:
    import cryptography
    import flwr

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}, "
        f"numpy {np.__version__}, cryptography {cryptography.__version__}, flwr {flwr.__version__}"
    )


def row(case: Case, m: Measurement) -> str:
    setup = f"{m.site_setup_s * 1e3:.2f}" if m.protocol == "fedinfer" else "(in every round)"
    return (
        f"| {case.n} | {case.d:.0e} | {round(case.drop_fraction * case.n)} | {m.protocol} | "
        f"{m.exchanges} | {setup} | {m.site_round_s * 1e3:,.1f} | {m.server_round_s * 1e3:,.1f} "
        f"| {m.max_error:.2e} | {m.bound:.2e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid, print only")
    parser.add_argument("--out", type=Path, default=Path("bench/results/secagg_vs_flower.md"))
    args = parser.parse_args()
    started = time.perf_counter()
    lines = [
        "| n sites | d params | dropped before upload | protocol | message exchanges / round "
        "| site set-up once per run (ms CPU) | site CPU / round (ms, mean) "
        "| coordinator CPU / round (ms) | max abs error of mean | error bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    speedups = []
    for warm_up in (run_fedinfer, run_flower):  # imports, OpenSSL and thread-pool start-up
        warm_up(Case(n=3, d=100, drop_fraction=0.0))
    for case in grid(args.quick):
        ours, theirs = run_fedinfer(case), run_flower(case)
        for m in (ours, theirs):
            lines.append(row(case, m))
            print(lines[-1], flush=True)
        speedups.append(
            (
                case,
                theirs.site_round_s / ours.site_round_s,
                theirs.server_round_s / ours.server_round_s,
            )
        )
    total = time.perf_counter() - started
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    report = "\n".join(
        [
            "# Secure aggregation: fedinfer vs Flower SecAgg+",
            "",
            "```",
            f". .venv/bin/activate && {command}",
            "```",
            "",
            f"Machine: {versions()}. Total bench wall time {total:.0f} s.",
            "",
            SETTINGS,
            "",
            *lines,
            "",
            "Speed-up of fedinfer over Flower SecAgg+, per round (ours without its one-time "
            "set-up):",
            "",
            "| n | d | dropped | site | coordinator |",
            "|---|---|---|---|---|",
            *[
                f"| {c.n} | {c.d:.0e} | {round(c.drop_fraction * c.n)} | {s:.1f}x | {v:.1f}x |"
                for c, s, v in speedups
            ],
            "",
            ACCURACY,
        ]
    )
    if args.quick:
        print(report)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
        print(f"wrote {args.out} in {total:.0f} s")


if __name__ == "__main__":
    main()
