"""Central (user-level) DP: wrap a Flower Message-API strategy with a server-side DP wrapper.

In ``privacy.mode=central`` the coordinator clips each site's model update to
``privacy.max_grad_norm`` and adds Gaussian noise of std
``central_noise_multiplier * clipping_norm / num_sampled_clients`` to the aggregate
(Flower's ``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping``). The guarantee
is per *site* and relies on a trusted coordinator; it needs plain (unmasked)
updates, so it cannot be combined with secure aggregation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fedinfer.config.schema import PrivacyConfig
from fedinfer.errors import ConfigError

__all__ = [
    "CENTRAL_DP_STRATEGIES",
    "SecureCentralDp",
    "central_dp_strategy",
    "central_epsilon",
    "wrap_central_dp",
]

CENTRAL_DP_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")
"""Mean aggregators: the noise is calibrated for a uniform mean of clipped updates."""


def central_rng(*, reproducible_seed: int | None = None) -> np.random.Generator:
    """PCG64 seeded with 256 bits of OS entropy (``reproducible_seed``: the config's, not DP)."""
    if reproducible_seed is not None:
        return np.random.default_rng(reproducible_seed)
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


class SecureCentralDp(DifferentialPrivacyServerSideFixedClipping):
    """Flower's fixed-clipping central DP with the three things our guarantee needs.

    - Noise from a private :class:`numpy.random.Generator` seeded from the OS CSPRNG, not
      from numpy's global RNG (which the coordinator seeds with ``cfg.seed``).
    - A *uniform* mean of the clipped updates: every site weighs 1, whatever its sample
      count, so one site moves the mean by at most ``clipping_norm / m``.
    - Noise std ``noise_multiplier * clipping_norm / m`` with ``m`` the replies really
      aggregated (never fewer than what the noise was calibrated for).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self._rng = rng if rng is not None else central_rng()
        self._aggregated = num_sampled_clients
        self.releases = 0
        """Noisy aggregates released so far (what :func:`central_epsilon` composes)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies_list = [r for r in replies if not r.has_error()]
        key = getattr(self.strategy, "weighted_by_key", None)
        if key is not None:
            for reply in replies_list:
                for record in reply.content.metric_records.values():
                    record[key] = 1.0  # a uniform mean: each site weighs the same
        self._aggregated = min(len(replies_list), self.num_sampled_clients) or 1
        arrays, metrics = super().aggregate_train(server_round, replies_list)
        return arrays, metrics

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = self.noise_multiplier * self.clipping_norm / self._aggregated
        arrays = aggregated_arrays.to_numpy_ndarrays()
        noisy = [a + self._rng.normal(0.0, std, a.shape).astype(a.dtype) for a in arrays]
        self.releases += 1
        return ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in zip(aggregated_arrays.keys(), noisy, strict=True)}
        )


def central_epsilon(*, noise_multiplier: float, releases: int, delta: float) -> float:
    """Site-level epsilon of ``releases`` Gaussian releases of the uniform mean (RDP).

    No amplification by sampling is claimed (``q=1``): an upper bound.
    """
    from fedinfer.privacy.accountant import epsilon_from_history

    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    return float(
        epsilon_from_history([(noise_multiplier, 1.0, releases)], delta=delta, accountant="rdp")
    )


def wrap_central_dp(
    strategy: Strategy,
    *,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_clients: int,
    adaptive: bool = False,
    rng: np.random.Generator | None = None,
) -> Strategy:
    """Wrap ``strategy`` with Flower's server-side central DP.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The aggregation strategy (e.g. ``FedAvg``).
    noise_multiplier : float
        Noise std relative to the clipping norm; >= 0.
    clipping_norm : float
        Update clipping norm (fixed), or the initial norm (adaptive); > 0.
    num_sampled_clients : int
        Sites sampled per training round; scales the noise of the average.
    adaptive : bool
        Adapt the clipping norm to the median of the update norms (Andrew et al.,
        arXiv:1905.03871) instead of keeping it fixed (default: False). Part of the
        privacy budget then goes to the noisy count of clipped updates, whose noise
        std is the paper's ``num_sampled_clients / 20``, raised to ``noise_multiplier``
        when that is too small for the split to exist (few sites); the total noise
        multiplier stays ``noise_multiplier``, the updates get about 1.15x more noise.

    Returns
    -------
    flwr.serverapp.strategy.Strategy
        The wrapped strategy.

    Raises
    ------
    ConfigError
        If a value is out of range (the message names the ``privacy`` key).

    Examples
    --------
    >>> from flwr.serverapp.strategy import FedAvg
    >>> dp = wrap_central_dp(FedAvg(), noise_multiplier=1.0, clipping_norm=1.0,
    ...                      num_sampled_clients=10)
    """
    if not noise_multiplier >= 0:
        raise ConfigError(
            f"`privacy.central_noise_multiplier` must be >= 0 (got {noise_multiplier})"
        )
    if not clipping_norm > 0:
        raise ConfigError(f"`privacy.max_grad_norm` must be > 0 (got {clipping_norm})")
    if num_sampled_clients <= 0:
        raise ConfigError(
            f"central DP needs at least one sampled site per round (got {num_sampled_clients}); "
            "check federation.num_sites and federation.fraction_train"
        )
    if adaptive:
        return DifferentialPrivacyServerSideAdaptiveClipping(
            strategy,
            noise_multiplier=noise_multiplier,
            num_sampled_clients=num_sampled_clients,
            initial_clipping_norm=clipping_norm,
            clipped_count_stddev=max(num_sampled_clients / 20, noise_multiplier),
        )
    if rng is not None or isinstance(strategy, FedAvg):
        return SecureCentralDp(
            strategy,
            noise_multiplier=noise_multiplier,
            clipping_norm=clipping_norm,
            num_sampled_clients=num_sampled_clients,
            rng=rng,
        )
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=noise_multiplier,
        clipping_norm=clipping_norm,
        num_sampled_clients=num_sampled_clients,
    )


def central_dp_strategy(
    strategy: Strategy, *, privacy: PrivacyConfig, num_sampled_clients: int
) -> Strategy:
    """Wrap ``strategy`` as the ``privacy`` config asks (``mode=central``).

    Uses ``central_noise_multiplier``, ``max_grad_norm`` as the clipping norm and
    ``central_adaptive``.
    """
    if privacy.mode != "central":
        raise ConfigError(f"`privacy.mode` is {privacy.mode!r}; central DP needs mode=central")
    return wrap_central_dp(
        strategy,
        noise_multiplier=privacy.central_noise_multiplier,
        clipping_norm=privacy.max_grad_norm,
        num_sampled_clients=num_sampled_clients,
        adaptive=privacy.central_adaptive,
    )
