"""Where DP randomness comes from: fresh OS entropy, never the config's seed.

Opacus draws two things at random: the Gaussian noise added to every clipped
gradient sum, and the Poisson mask that picks each step's batch. If either is
derived from ``cfg.seed`` (as it once was, through ``round_seed``), anyone who
knows the run config (the coordinator does) can replay the noise bit for bit,
subtract it from a site's update and undo the guarantee.

Here every DP round gets its own :class:`torch.Generator` for the noise and
another for the sampler, each seeded with 64 bits from :func:`os.urandom`.
The seeds are never stored or sent. A ``torch.Generator`` is not itself a
CSPRNG (Mersenne Twister on the CPU, Philox on CUDA); it is seeded from one,
fresh for every site and round, and nothing outside the site sees its raw
outputs, only a noisy sum. Opacus' ``secure_mode=True`` would use a CSPRNG
for every draw, but it needs ``torchcsprng``, which has no build for our torch
pin (see BENCHMARKS.md, "DP randomness").

``privacy.reproducible_noise=true`` brings the old seeded behaviour back for
simulations that must be bit-for-bit repeatable; such a run is **not DP**, it is
marked ``"dp": false`` in ``results.json`` and the model manifest, and a deployed
site, ``fedinfer coordinator`` and the deployment ServerApp refuse it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fedinfer.config.schema import PrivacyConfig
from fedinfer.errors import ConfigError

__all__ = [
    "DpRandomness",
    "dp_randomness",
    "provides_dp",
    "refuse_reproducible_noise",
    "secure_generator",
    "secure_seed",
]

REPRODUCIBLE_NOISE_KEY = "privacy.reproducible_noise"


def secure_seed() -> int:
    """63 bits from the OS CSPRNG (a valid ``torch.Generator.manual_seed`` argument)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded from :func:`os.urandom`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secure_seed())
    return generator


@dataclass(frozen=True)
class DpRandomness:
    """The seeds of one DP round: torch's global RNG, the Poisson sampler, the noise."""

    global_seed: int
    sampler_seed: int
    noise_seed: int
    reproducible: bool

    def noise_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The generator Opacus draws the Gaussian noise from (on the model's device)."""
        generator = torch.Generator(device=device)
        generator.manual_seed(self.noise_seed)
        return generator


def dp_randomness(
    *, seed: int, site_id: str, server_round: int, reproducible: bool
) -> DpRandomness:
    """Seeds for one site's DP round: fresh OS entropy unless ``reproducible`` (not DP)."""
    if reproducible:
        from fedinfer.fl.site import round_seed

        base = round_seed(seed, site_id, server_round)
        return DpRandomness(base, base, round_seed(seed, f"{site_id}/noise", server_round), True)
    return DpRandomness(secure_seed(), secure_seed(), secure_seed(), False)


def provides_dp(privacy: PrivacyConfig) -> bool:
    """Whether a run with this ``privacy`` group is differentially private at all.

    False for ``mode=none`` and for ``reproducible_noise=true`` (replayable noise is no noise).
    """
    return privacy.mode in ("dpsgd", "central") and not privacy.reproducible_noise


def refuse_reproducible_noise(reproducible_noise: bool, *, where: str) -> None:
    """Refuse ``privacy.reproducible_noise=true`` outside a simulation.

    Raises
    ------
    ConfigError
        Naming the key, when ``reproducible_noise`` is set.
    """
    if reproducible_noise:
        raise ConfigError(
            f"`{REPRODUCIBLE_NOISE_KEY}`=true makes the DP noise replayable from the config "
            f"(not DP) and is for simulations only; {where} refuses it: set "
            f"{REPRODUCIBLE_NOISE_KEY}=false"
        )
