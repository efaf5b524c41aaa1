"""The fedinfer exception tree.

Every error a user can cause by a mistake derives from :class:`FedInferError`;
the CLI turns these into a one-line message and exit code 2 instead of a
traceback. Anything else reaching the CLI is a bug in fedinfer.

::

    FedInferError
    ├── ConfigError              a config key has a bad value (the message names the key)
    ├── DataError                a dataset file / column / split problem
    ├── PrivacyBudgetExceeded    a site would spend more epsilon than `privacy.max_epsilon`
    ├── PrivacyLedgerError       a site's privacy ledger is missing, corrupt or inconsistent
    ├── PolicyViolation          a coordinator's request breaks the site's policy (names the key)
    ├── SecAggAbort              a secure-aggregation round cannot complete (too few survivors ...)
    ├── ModelIntegrityError      an artifact's hash or signature does not verify
    ├── ServingError             the inference server cannot start or serve as asked
    └── StateKeyError            encrypted state: the site key is missing, wrong or unsafe
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "FedInferError",
    "ModelIntegrityError",
    "PrivacyBudgetExceeded",
    "PolicyViolation",
    "PrivacyLedgerError",
    "SecAggAbort",
    "ServingError",
    "StateKeyError",
]


class FedInferError(Exception):
    """Base class of every error a fedinfer user can cause and fix."""


class ConfigError(FedInferError, ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


class DataError(FedInferError):
    """A dataset cannot be loaded, split or partitioned as configured."""


class PrivacyBudgetExceeded(FedInferError):
    """Training a round would push a site's cumulative epsilon past its budget."""

    def __init__(self, message: str, *, spent: float, projected: float, budget: float) -> None:
        super().__init__(message)
        self.spent = spent
        self.projected = projected
        self.budget = budget


class PrivacyLedgerError(FedInferError):
    """A site's privacy ledger cannot be trusted as is: missing, corrupt, or used inconsistently.

    Never answered by resetting the ledger: that would silently reset the site's budget.
    """


class PolicyViolation(FedInferError):
    """A coordinator's request breaks the site's policy; ``key`` names the policy key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class SecAggAbort(FedInferError):
    """A secure-aggregation round cannot be completed without leaking an update."""


class ModelIntegrityError(FedInferError):
    """A model artifact's hash or signature does not verify; it must never be served."""


class ServingError(FedInferError):
    """The inference server cannot start or serve as configured."""


class StateKeyError(FedInferError):
    """A site's state is encrypted at rest and its key is missing, wrong or unsafe.

    Also raised for a plaintext state file where an encrypted one is expected (and the
    reverse): the fix is always about the key (``--state-key``) or a migration.
    """
