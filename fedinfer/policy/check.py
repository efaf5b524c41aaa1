"""Check a coordinator's request against the site's policy, before the site's data is touched.

The request is everything the coordinator decides: the run config (privacy, secure
aggregation, local training) and, with secure aggregation, the round's threshold and
participants. A violation raises :class:`~fedinfer.errors.PolicyViolation` naming the policy
key; nothing is ever silently changed. What the site computes from its own data (sample
count, the noise multiplier derived from ``target_epsilon``) uses only counts, never records.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

from fedinfer.errors import PolicyViolation
from fedinfer.policy.schema import PRIVACY_MODES, SitePolicy

if TYPE_CHECKING:  # fedinfer.config.schema imports SitePolicy from this package
    from fedinfer.config.schema import FedInferConfig
    from fedinfer.secagg.messages import RoundConfig

__all__ = [
    "WITHHELD_WEIGHT",
    "check_evaluate",
    "check_secagg_peers",
    "check_secagg_round",
    "check_train",
    "policy_accepting",
    "release_metrics",
    "secagg_threshold_floor",
    "site_config",
    "site_delta",
    "trusted_identities",
]

WITHHELD_WEIGHT = 1.0
"""``num-examples`` sent when the count may not leave: every site weighs the same."""


def _refuse(key: str, detail: str) -> PolicyViolation:
    return PolicyViolation(key, f"policy {key}: {detail}; the site refuses (its policy, not yours)")


def _check_mode(policy: SitePolicy, cfg: FedInferConfig) -> None:
    requested = cfg.privacy.mode
    if requested not in PRIVACY_MODES or PRIVACY_MODES.index(requested) > PRIVACY_MODES.index(
        policy.privacy_mode
    ):
        raise _refuse(
            "privacy_mode",
            f"the coordinator asks for privacy.mode={requested!r}, "
            f"the site requires {policy.privacy_mode!r}",
        )


def site_delta(policy: SitePolicy, num_samples: int) -> float:
    """The delta the site accounts at: the policy's, else ``1 / (10 n)``."""
    from fedinfer.privacy import default_delta

    return policy.delta if policy.delta is not None else default_delta(num_samples)


def _check_dpsgd(policy: SitePolicy, cfg: FedInferConfig, num_samples: int) -> None:
    dp = cfg.privacy
    if policy.require_poisson_sampling and not dp.poisson_sampling:
        raise _refuse("require_poisson_sampling", "privacy.poisson_sampling=false")
    for name, value in (("max_epsilon", dp.max_epsilon), ("target_epsilon", dp.target_epsilon)):
        if value is not None and value > policy.max_epsilon:
            raise _refuse(
                "max_epsilon",
                f"privacy.{name}={value:g} exceeds the site's budget {policy.max_epsilon:g}",
            )
    delta = site_delta(policy, num_samples)
    if dp.delta is not None and not math.isclose(dp.delta, delta, rel_tol=1e-9):
        raise _refuse("delta", f"privacy.delta={dp.delta:g}; the site accounts at {delta:g}")
    sample_rate, steps = _check_sampling(policy, cfg, num_samples)
    _check_noise(policy, cfg, delta=delta, sample_rate=sample_rate, steps=steps)


def _check_sampling(
    policy: SitePolicy, cfg: FedInferConfig, num_samples: int
) -> tuple[float, int]:
    """The request's sample rate and steps per round, as the site's Poisson loader will use them."""
    fed = cfg.federation
    steps_per_epoch = max(1, math.ceil(num_samples / fed.batch_size))
    sample_rate = 1 / steps_per_epoch
    if sample_rate > policy.max_sample_rate:
        raise _refuse(
            "max_sample_rate",
            f"federation.batch_size={fed.batch_size} samples {sample_rate:.3g} of the site's "
            f"records per step (most: {policy.max_sample_rate:g})",
        )
    steps = fed.local_epochs * steps_per_epoch
    if policy.max_steps_per_round is not None and steps > policy.max_steps_per_round:
        raise _refuse(
            "max_steps_per_round",
            f"{steps} DP-SGD steps per round (most: {policy.max_steps_per_round})",
        )
    return sample_rate, steps


def _check_noise(
    policy: SitePolicy, cfg: FedInferConfig, *, delta: float, sample_rate: float, steps: int
) -> None:
    dp = cfg.privacy
    if dp.target_epsilon is None and dp.noise_multiplier is None:
        raise _refuse("min_noise_multiplier", "the request sets no noise multiplier")
    noise = _noise_multiplier(
        dp.accountant,
        dp.target_epsilon,
        dp.noise_multiplier,
        delta=delta,
        sample_rate=sample_rate,
        planned_steps=cfg.federation.rounds * steps,
    )
    if noise < policy.min_noise_multiplier:
        raise _refuse(
            "min_noise_multiplier",
            f"noise multiplier {noise:.3g} is below the site's floor "
            f"{policy.min_noise_multiplier:g}",
        )


@functools.lru_cache(maxsize=64)
def _noise_multiplier(
    accountant: str,
    target_epsilon: float | None,
    noise_multiplier: float | None,
    *,
    delta: float,
    sample_rate: float,
    planned_steps: int,
) -> float:
    """The noise the site's training will use; cached: deriving it from a target takes ~1 s,
    and a site's request is the same every round."""
    from fedinfer.config.schema import PrivacyConfig
    from fedinfer.privacy.budget import resolve_noise_multiplier

    privacy = PrivacyConfig(
        mode="dpsgd",
        accountant=accountant,
        target_epsilon=target_epsilon,
        noise_multiplier=noise_multiplier,
        delta=delta,
    )
    return resolve_noise_multiplier(
        privacy, delta=delta, sample_rate=sample_rate, planned_steps=planned_steps
    )


def check_train(policy: SitePolicy, cfg: FedInferConfig, *, num_samples: int) -> None:
    """Refuse a train request that the policy does not allow (before any data is touched).

    Raises
    ------
    PolicyViolation
        Naming the first policy key the request violates.

    Examples
    --------
    >>> from fedinfer.config import load_config
    >>> check_train(SitePolicy(), load_config(["privacy=none"]), num_samples=2000)
    Traceback (most recent call last):
    ...
    fedinfer.errors.PolicyViolation: policy privacy_mode: ...
    """
    _check_mode(policy, cfg)
    if cfg.federation.local_epochs > policy.max_local_epochs:
        raise _refuse(
            "max_local_epochs",
            f"federation.local_epochs={cfg.federation.local_epochs} "
            f"(most: {policy.max_local_epochs})",
        )
    if policy.require_secagg and not cfg.secagg.enabled:
        raise _refuse("require_secagg", "secagg.enabled=false would send the update in the clear")
    if cfg.privacy.mode == "dpsgd":
        _check_dpsgd(policy, cfg, num_samples)


def check_secagg_round(policy: SitePolicy, *, threshold: int, participants: int) -> None:
    """Refuse a secure-aggregation round with too few participants or too low a threshold.

    The floor is :func:`secagg_threshold_floor`: at least ``secagg_min_threshold`` of the
    participants and strictly more than half of them, whatever the policy's fraction.
    """
    if participants < policy.secagg_min_participants:
        raise _refuse(
            "secagg_min_participants",
            f"{participants} participant(s) (fewest: {policy.secagg_min_participants})",
        )
    floor = secagg_threshold_floor(policy, participants=participants)
    if threshold < floor:
        raise _refuse(
            "secagg_min_threshold",
            f"threshold {threshold} of {participants} participants (floor: {floor})",
        )


def trusted_identities(policy: SitePolicy) -> frozenset[bytes] | None:
    """The identity keys of the peers ``secagg_trusted_peers`` lists; None: no list."""
    if policy.secagg_trusted_peers is None:
        return None
    from fedinfer.policy.peers import load_peers

    return frozenset(load_peers(Path(policy.secagg_trusted_peers)).values())


def check_secagg_peers(policy: SitePolicy, round_config: RoundConfig, *, site_id: int) -> None:
    """Refuse a secure-aggregation round with a participant that is not a listed peer.

    Every participant but the site itself (``site_id``) must present run keys endorsed, for
    this run and its site id, by an identity key of ``secagg_trusted_peers``, each by a
    different one (:func:`fedinfer.secagg.site.untrusted_participants`). Without a list the
    round passes: the protocol then accepts any endorsed participant.
    """
    trusted = trusted_identities(policy)
    if trusted is None:
        return
    from fedinfer.secagg.site import untrusted_participants

    strangers = untrusted_participants(round_config, trusted, site_id=site_id)
    if strangers:
        raise _refuse(
            "secagg_trusted_peers",
            f"{len(strangers)} participant(s) of the round (node ids {strangers}) are not "
            f"peers listed in {policy.secagg_trusted_peers} (an identity key not listed, used "
            "twice, or without its endorsement): a coordinator could fill the round with "
            "sites of its own; if a real site joined, its operator runs `fedinfer site "
            "identity` and every site adds that line to the file",
        )


def secagg_threshold_floor(policy: SitePolicy, *, participants: int) -> int:
    """The fewest Shamir shares the policy accepts for a round of ``participants`` sites.

    ``ceil(secagg_min_threshold * participants)``, but never at or below half of them (two
    disjoint survivor groups could each unmask a sum) nor below 2. The site's
    secure-aggregation code applies the same rule, with this policy's fraction, again
    before it masks (:func:`fedinfer.secagg.site.threshold_floor`).
    """
    from fedinfer.secagg.site import threshold_floor  # the protocol package, loaded on use

    return threshold_floor(policy.secagg_min_threshold, participants=participants)


def check_evaluate(policy: SitePolicy, cfg: FedInferConfig) -> None:
    """Refuse federated evaluation in DP mode unless ``allow_evaluation`` (exact metrics leak)."""
    _check_mode(policy, cfg)
    if cfg.privacy.mode == "dpsgd" and not policy.allow_evaluation:
        raise _refuse(
            "allow_evaluation",
            "exact evaluation metrics on coordinator-chosen weights lie outside the DP guarantee",
        )


def release_metrics(
    policy: SitePolicy, cfg: FedInferConfig, metrics: dict[str, float]
) -> dict[str, float]:
    """The train metrics that may leave the site.

    In DP mode only ``allowed_metrics`` leave. The per-site count ``num-examples`` (the
    weight Flower aggregates by) leaves only if allowed and never with secure aggregation on
    (the masked upload carries it inside the sum); otherwise it is sent as
    :data:`WITHHELD_WEIGHT`, so the aggregate is a uniform mean.
    """
    dp = cfg.privacy.mode == "dpsgd"
    released = {k: v for k, v in metrics.items() if not dp or k in policy.allowed_metrics}
    count_allowed = (not dp or "num-examples" in policy.allowed_metrics) and not cfg.secagg.enabled
    if not count_allowed or "num-examples" not in released:
        released["num-examples"] = WITHHELD_WEIGHT
    return released


def site_config(policy: SitePolicy, cfg: FedInferConfig, *, num_samples: int) -> FedInferConfig:
    """The config the site trains with: the request, accounted at the site's own delta.

    Call after :func:`check_train`, which refused any request with another delta or a budget
    above the site's, so the only difference is that a request leaving ``privacy.delta`` to
    the default gets the site's.
    """
    if cfg.privacy.mode != "dpsgd" or policy.delta is None:
        return cfg  # None on both sides: the ledger's own 1 / (10 n)
    privacy = dataclasses.replace(cfg.privacy, delta=policy.delta)
    return dataclasses.replace(cfg, privacy=privacy)


def policy_accepting(
    cfg: FedInferConfig,
    *,
    num_sites: int,
    base: SitePolicy | None = None,
    coordinator_key_fingerprint: str | None = None,
) -> SitePolicy:
    """``base`` (default: the strict policy) relaxed just enough to accept the run ``cfg``.

    For a one-operator deployment (``fedinfer deploy local``), where the same person
    configures the run and every site. What the strict policy withholds (metrics,
    evaluation in DP mode) stays withheld; the noise floor is relaxed only for a noise
    multiplier set directly (one derived from ``target_epsilon`` is checked as is).
    """
    base = base or SitePolicy()
    dp, sa = cfg.privacy, cfg.secagg
    weakest = max(PRIVACY_MODES.index(base.privacy_mode), PRIVACY_MODES.index(dp.mode))
    fraction = sa.threshold if sa.threshold <= 1 else sa.threshold / max(num_sites, 1)
    noise = dp.noise_multiplier if dp.target_epsilon is None else None
    return dataclasses.replace(
        base,
        privacy_mode=PRIVACY_MODES[weakest],
        max_epsilon=max(base.max_epsilon, dp.max_epsilon, dp.target_epsilon or 0.0),
        delta=dp.delta if dp.delta is not None else base.delta,
        min_noise_multiplier=min(base.min_noise_multiplier, noise)
        if noise is not None
        else base.min_noise_multiplier,
        max_local_epochs=max(base.max_local_epochs, cfg.federation.local_epochs),
        require_poisson_sampling=base.require_poisson_sampling and dp.poisson_sampling,
        require_secagg=base.require_secagg and sa.enabled,
        secagg_min_threshold=min(base.secagg_min_threshold, fraction),
        secagg_min_participants=max(2, min(base.secagg_min_participants, num_sites)),
        coordinator_key_fingerprint=coordinator_key_fingerprint,
    )
