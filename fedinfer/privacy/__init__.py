"""Differential privacy for fedinfer sites: Opacus DP-SGD, a persistent ledger, central DP.

- :mod:`~fedinfer.privacy.accountant`: accountant registry and pure epsilon functions.
- :mod:`~fedinfer.privacy.ledger`: the site's persistent, cumulative ``ledger.json``.
- :mod:`~fedinfer.privacy.budget`: noise derivation and the per-round budget check.
- :mod:`~fedinfer.privacy.dpsgd`: model validation and the ``make_private`` façade.
- :mod:`~fedinfer.privacy.central`: Flower's server-side DP strategy wrappers (imported
  lazily, so a site or ``fedinfer privacy show`` does not pay for importing Flower).
- :mod:`~fedinfer.privacy.report`: the ledger as a table.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedinfer.privacy.accountant import (
        ACCOUNTANTS,
        PRV_MAX_GRID_POINTS,
        RDP_ORDERS,
        HistoryEntry,
        create_accountant,
        default_delta,
        derive_noise_multiplier,
        epsilon_from_history,
        merge_history,
        prv_epsilon,
    )
    from fedinfer.privacy.budget import (
        PRIVACY_MODES,
        RoundPlan,
        plan_round,
        resolve_noise_multiplier,
    )
    from fedinfer.privacy.dpsgd import (
        DEFAULT_GRAD_SAMPLE_MODE,
        GRAD_SAMPLE_MODES,
        PrivateTraining,
        make_private,
        validate_model,
    )
    from fedinfer.privacy.ledger import LEDGER_FILENAME, LedgerEntry, PrivacyLedger
    from fedinfer.privacy.report import ledger_table, print_ledger, show_ledger

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_GRAD_SAMPLE_MODE",
    "GRAD_SAMPLE_MODES",
    "LEDGER_FILENAME",
    "PRIVACY_MODES",
    "PRV_MAX_GRID_POINTS",
    "RDP_ORDERS",
    "HistoryEntry",
    "LedgerEntry",
    "PrivacyLedger",
    "PrivateTraining",
    "RoundPlan",
    "central_dp_strategy",
    "create_accountant",
    "default_delta",
    "derive_noise_multiplier",
    "epsilon_from_history",
    "ledger_table",
    "make_private",
    "merge_history",
    "plan_round",
    "print_ledger",
    "prv_epsilon",
    "resolve_noise_multiplier",
    "show_ledger",
    "validate_model",
    "wrap_central_dp",
]

# Every name is imported on first use: `fedinfer --help` and `fedinfer privacy show --help`
# must not pay for torch and Opacus (seconds).
_LAZY: dict[str, str] = {
    "central_dp_strategy": "fedinfer.privacy.central",
    "wrap_central_dp": "fedinfer.privacy.central",
    "ACCOUNTANTS": "fedinfer.privacy.accountant",
    "PRV_MAX_GRID_POINTS": "fedinfer.privacy.accountant",
    "RDP_ORDERS": "fedinfer.privacy.accountant",
    "HistoryEntry": "fedinfer.privacy.accountant",
    "create_accountant": "fedinfer.privacy.accountant",
    "default_delta": "fedinfer.privacy.accountant",
    "derive_noise_multiplier": "fedinfer.privacy.accountant",
    "epsilon_from_history": "fedinfer.privacy.accountant",
    "merge_history": "fedinfer.privacy.accountant",
    "prv_epsilon": "fedinfer.privacy.accountant",
    "PRIVACY_MODES": "fedinfer.privacy.budget",
    "RoundPlan": "fedinfer.privacy.budget",
    "plan_round": "fedinfer.privacy.budget",
    "resolve_noise_multiplier": "fedinfer.privacy.budget",
    "DEFAULT_GRAD_SAMPLE_MODE": "fedinfer.privacy.dpsgd",
    "GRAD_SAMPLE_MODES": "fedinfer.privacy.dpsgd",
    "PrivateTraining": "fedinfer.privacy.dpsgd",
    "make_private": "fedinfer.privacy.dpsgd",
    "validate_model": "fedinfer.privacy.dpsgd",
    "LEDGER_FILENAME": "fedinfer.privacy.ledger",
    "LedgerEntry": "fedinfer.privacy.ledger",
    "PrivacyLedger": "fedinfer.privacy.ledger",
    "ledger_table": "fedinfer.privacy.report",
    "print_ledger": "fedinfer.privacy.report",
    "show_ledger": "fedinfer.privacy.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
