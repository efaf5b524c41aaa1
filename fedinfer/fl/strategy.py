"""Build Flower's Message-API strategy from ``strategy`` / ``federation`` / ``privacy`` config."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fedinfer.config.schema import FedInferConfig
from fedinfer.errors import ConfigError
from fedinfer.fl.messages import Keys

__all__ = ["build_strategy", "sampled_per_round"]


def sampled_per_round(cfg: FedInferConfig, num_sites: int) -> int:
    """How many sites Flower samples for training each round."""
    return max(
        int(num_sites * cfg.federation.fraction_train), min(cfg.federation.min_sites, num_sites), 1
    )


def build_strategy(cfg: FedInferConfig, *, num_sites: int) -> Strategy:
    """The strategy for ``strategy.name``, wrapped for central DP when ``privacy.mode=central``.

    Examples
    --------
    >>> from fedinfer.config import load_config
    >>> strategy = build_strategy(load_config(["strategy=fedadam"]), num_sites=10)
    >>> type(strategy).__name__
    'FedAdam'
    """
    fed, st = cfg.federation, cfg.strategy
    minimum = min(fed.min_sites, num_sites)
    common: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": minimum,
        "min_evaluate_nodes": minimum,
        "min_available_nodes": minimum,
        "weighted_by_key": "num-examples",
        "arrayrecord_key": Keys.ARRAYS,
        "configrecord_key": Keys.CONFIG,
    }
    builders: dict[str, Any] = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=st.proximal_mu),
        "fedadam": lambda: FedAdam(
            **common, eta=st.server_lr, eta_l=fed.lr, beta_1=st.beta_1, beta_2=st.beta_2, tau=st.tau
        ),
        "fedavgm": lambda: FedAvgM(
            **common, server_learning_rate=st.server_lr, server_momentum=st.server_momentum
        ),
        "fedmedian": lambda: FedMedian(**common),
        "trimmed_mean": lambda: FedTrimmedAvg(**common, beta=st.trim_beta),
        "krum": lambda: Krum(**common, num_malicious_nodes=st.num_malicious),
    }
    if st.name not in builders:
        raise ConfigError(
            f"`strategy.name` is {st.name!r}; choose one of {', '.join(sorted(builders))}"
        )
    strategy: Strategy = builders[st.name]()
    if cfg.privacy.mode == "central":
        from fedinfer.privacy.central import central_rng, wrap_central_dp

        strategy = wrap_central_dp(
            strategy,
            noise_multiplier=cfg.privacy.central_noise_multiplier,
            clipping_norm=cfg.privacy.max_grad_norm,
            num_sampled_clients=sampled_per_round(cfg, num_sites),
            adaptive=cfg.privacy.central_adaptive,
            # OS entropy; the config's seed only with privacy.reproducible_noise (not DP).
            rng=central_rng(
                reproducible_seed=cfg.seed if cfg.privacy.reproducible_noise else None
            ),
        )
    return strategy
