"""The site policy: a site's own rules, checked against every request of the coordinator.

See :mod:`fedinfer.policy.schema` for the keys, :mod:`fedinfer.policy.check` for the checks
and the README's "Site policy" section for what the coordinator still learns.
"""

from __future__ import annotations

from fedinfer.policy.check import (
    WITHHELD_WEIGHT,
    check_evaluate,
    check_secagg_peers,
    check_secagg_round,
    check_train,
    policy_accepting,
    release_metrics,
    secagg_threshold_floor,
    site_config,
    site_delta,
    trusted_identities,
)
from fedinfer.policy.io import (
    POLICY_FILENAME,
    load_policy,
    policy_from_mapping,
    save_policy,
    validate_policy,
)
from fedinfer.policy.peers import PEERS_FILENAME, identity_fingerprint, load_peers, save_peers
from fedinfer.policy.schema import DP_METRICS, PRIVACY_MODES, TRAIN_METRICS, SitePolicy

__all__ = [
    "DP_METRICS",
    "PEERS_FILENAME",
    "POLICY_FILENAME",
    "PRIVACY_MODES",
    "TRAIN_METRICS",
    "WITHHELD_WEIGHT",
    "SitePolicy",
    "check_evaluate",
    "check_secagg_peers",
    "check_secagg_round",
    "check_train",
    "identity_fingerprint",
    "load_peers",
    "load_policy",
    "policy_accepting",
    "policy_from_mapping",
    "release_metrics",
    "save_peers",
    "save_policy",
    "secagg_threshold_floor",
    "site_config",
    "site_delta",
    "trusted_identities",
    "validate_policy",
]
