"""The site policy: what a site accepts from a coordinator, and what may leave it.

One :class:`SitePolicy` per site, kept in the site's state directory
(``site_policy.toml``) and never sent by the coordinator. Every train / evaluate
request is checked against it before the site's data is touched
(:mod:`fedinfer.policy.check`); a violation is refused, naming the policy key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DP_METRICS", "PRIVACY_MODES", "TRAIN_METRICS", "SitePolicy"]

PRIVACY_MODES = ("dpsgd", "central", "none")
"""Strongest first: a policy requiring one mode accepts it and every mode to its left."""

DP_METRICS = ("epsilon", "delta", "noise-multiplier", "sample-rate", "dp-steps")
TRAIN_METRICS = ("num-examples", "train-loss", "train-accuracy", "steps", "train-time-s")


@dataclass
class SitePolicy:
    """A site's own rules; the defaults are the strict policy ``fedinfer site init-policy`` writes.

    The same dataclass is the ``site_policy`` config group of a simulation, where it is
    applied on the site side only (never part of what the coordinator sends).
    """

    privacy_mode: str = "dpsgd"
    """Weakest privacy mode accepted: ``dpsgd`` (site-level DP-SGD only), ``central``
    (also the coordinator's central DP, which trusts the coordinator) or ``none`` (anything)."""
    max_epsilon: float = 10.0
    """The site's own budget: its ledger refuses a round that would pass it. A request with a
    larger ``privacy.max_epsilon`` or ``privacy.target_epsilon`` is refused."""
    delta: float | None = None
    """The site's delta; None: 1 / (10 * local training samples). A request with a larger
    ``privacy.delta`` is refused; the ledger always accounts at this delta."""
    min_noise_multiplier: float = 0.5
    """Smallest DP-SGD noise multiplier accepted (requested, or derived from target_epsilon)."""
    max_sample_rate: float = 1.0
    """Largest DP-SGD sampling rate (batch size / local samples) accepted."""
    max_local_epochs: int = 5
    """Most local epochs per round."""
    max_steps_per_round: int | None = None
    """Most DP-SGD steps per round (epochs x batches); None: no limit beyond the epochs."""
    require_poisson_sampling: bool = True
    """Refuse DP-SGD without Poisson sampling (the accountant assumes it)."""
    require_secagg: bool = True
    """Refuse to send an update outside secure aggregation."""
    secagg_min_threshold: float = 0.5
    """Smallest Shamir threshold accepted, as a fraction of the round's participants; never
    at or below half of them, whatever this says (two disjoint survivor groups could then
    each unmask a sum). Also the floor the site's secure-aggregation code enforces."""
    secagg_min_participants: int = 3
    """Fewest participants of a secure-aggregation round (fewer: the sum reveals too much)."""
    secagg_trusted_peers: str | None = None
    """A peers file (TOML, site name -> identity public key; relative to the policy file)
    naming the real sites of the federation (:mod:`fedinfer.policy.peers`): a
    secure-aggregation round with any other participant is refused, so a coordinator cannot
    add sites of its own making (Sybils). None: any participant whose keys are endorsed by
    *some* identity key is accepted, and the site warns once per run."""
    allowed_metrics: list[str] = field(default_factory=lambda: ["epsilon"])
    """In DP mode, the only reply metrics that leave the site (the rest are withheld)."""
    allow_evaluation: bool = False
    """In DP mode, answer federated evaluation (exact metrics on coordinator-chosen weights,
    outside the DP guarantee). False: refused."""
    coordinator_key_fingerprint: str | None = None
    """Pinned fingerprint (``fedinfer.artifacts.key_fingerprint``) of the coordinator's
    model-signing key; None: not pinned. Another key is refused."""
