"""Central (user-level) DP: wrap a Flower Message-API strategy with a server-side DP wrapper.

In ``privacy.mode=central`` the coordinator clips each site's model update to
``privacy.max_grad_norm`` and adds Gaussian noise of std
``central_noise_multiplier * clipping_norm / num_sampled_clients`` to the aggregate
(Flower's ``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping``). The guarantee
is per *site* and relies on a trusted coordinator; it needs plain (unmasked)
updates, so it cannot be combined with secure aggregation.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedinfer.config.schema import PrivacyConfig
from fedinfer.errors import ConfigError

__all__ = ["central_dp_strategy", "wrap_central_dp"]


def wrap_central_dp(
    strategy: Strategy,
    *,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_clients: int,
    adaptive: bool = False,
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
