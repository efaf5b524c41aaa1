"""Cost of unpredictable DP randomness: seeded vs OS-entropy-seeded vs Opacus secure mode.

One "round" = a fresh ``make_private`` + one Poisson-sampled epoch of DP-SGD on
MNIST-1D-shaped synthetic data (40 features, 10 classes), the quickstart's model
and batch size, as a site trains it. Variants, timed round-robin (so load from
other processes hits all alike), median per step reported:

- ``seeded``: the old behaviour (noise from torch's global RNG and Poisson masks from
  the loader generator, both seeded from the config's seed; replayable, not DP);
- ``urandom``: what a site does now (``fedinfer.privacy.noise.dp_randomness``: fresh
  ``torch.Generator``s seeded from ``os.urandom`` for the noise and for the sampler);
- ``secure_mode``: Opacus ``PrivacyEngine(secure_mode=True)`` (a CSPRNG for every draw);
  needs ``torchcsprng``, which has no build for torch 2.13: reported as unavailable.

    PYTHONPATH=. python bench/dp_rng.py [--rounds 7] [--model cnn1d]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedinfer.config.schema import ModelConfig
from fedinfer.models import build_model
from fedinfer.privacy import make_private
from fedinfer.privacy.noise import dp_randomness

warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Secure RNG turned off")

INPUT_DIM, NUM_CLASSES, SAMPLES = 40, 10, 2000


def one_round(model_name: str, batch: int, variant: str, data: TensorDataset) -> float:
    """Seconds per DP-SGD step of one round of ``variant``."""
    randomness = dp_randomness(
        seed=42, site_id="site-00", server_round=1, reproducible=(variant == "seeded")
    )
    torch.manual_seed(randomness.global_seed)
    model = build_model(ModelConfig(name=model_name), input_dim=INPUT_DIM, num_classes=NUM_CLASSES)
    loader = DataLoader(
        data,
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(randomness.sampler_seed),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    private = make_private(
        model=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_generator=None if variant == "seeded" else randomness.noise_generator(),
    )
    steps, started = 0, time.perf_counter()
    for x, y in private.data_loader:
        private.optimizer.zero_grad()
        if len(x):
            F.cross_entropy(private.model(x), y).backward()
        private.optimizer.step()
        steps += 1
    return (time.perf_counter() - started) / max(steps, 1)


def secure_mode_available() -> str:
    from opacus import PrivacyEngine

    try:
        PrivacyEngine(accountant="rdp", secure_mode=True)
    except ImportError as err:
        return f"unavailable ({err.__class__.__name__}: {str(err).splitlines()[0][:80]})"
    return "available"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(SAMPLES, INPUT_DIM, generator=gen),
        torch.randint(0, NUM_CLASSES, (SAMPLES,), generator=gen),
    )
    variants = ("seeded", "urandom")
    times: dict[str, list[float]] = {v: [] for v in variants}
    one_round(args.model, args.batch, "seeded", data)  # warm-up
    for _ in range(args.rounds):
        for variant in variants:
            times[variant].append(one_round(args.model, args.batch, variant, data))
    started = time.perf_counter()
    for _ in range(1000):
        dp_randomness(seed=0, site_id="s", server_round=1, reproducible=False)
    per_round_us = (time.perf_counter() - started) * 1000  # 1000 calls -> microseconds each
    base = statistics.median(times["seeded"])
    print(f"# dp_rng: {args.model}, batch {args.batch}, {SAMPLES} samples, {args.rounds} rounds")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print("| variant | median ms/step | ratio to seeded |")
    print("|---|---|---|")
    for variant in variants:
        median = statistics.median(times[variant])
        print(f"| {variant} | {median * 1e3:.3f} | {median / base:.3f} |")
    print(f"| secure_mode | - | {secure_mode_available()} |")
    print(f"\ndp_randomness() per round: {per_round_us:.1f} us (3 x os.urandom(8))")


if __name__ == "__main__":
    main()
