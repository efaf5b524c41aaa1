"""From the ``privacy`` config to a checked DP-SGD round: validation, noise, budget.

A site's train handler calls :func:`plan_round` before it touches its data, trains
with :func:`~fedinfer.privacy.dpsgd.make_private` using the plan's noise multiplier,
then charges ``plan.ledger`` with the steps really taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fedinfer.config.schema import PrivacyConfig
from fedinfer.errors import ConfigError
from fedinfer.privacy.accountant import ACCOUNTANTS, derive_noise_multiplier
from fedinfer.privacy.dpsgd import GRAD_SAMPLE_MODES
from fedinfer.privacy.ledger import PrivacyLedger

__all__ = [
    "PRIVACY_MODES",
    "RoundPlan",
    "check_privacy_config",
    "plan_round",
    "resolve_noise_multiplier",
]

PRIVACY_MODES: tuple[str, ...] = ("central", "dpsgd", "none")


@dataclass(frozen=True)
class RoundPlan:
    """What a site may spend this round, checked against its budget."""

    noise_multiplier: float
    sample_rate: float
    """``1 / steps_per_epoch``: the Poisson rate Opacus's DPDataLoader will use."""
    steps: int
    """Planned steps this round (an upper bound: Poisson epochs can be a step shorter)."""
    delta: float
    spent: float
    """Cumulative epsilon before the round."""
    projected: float
    """Cumulative epsilon after the planned steps; at most ``privacy.max_epsilon``."""
    ledger: PrivacyLedger


def check_privacy_config(privacy: PrivacyConfig) -> None:
    """Raise a :class:`ConfigError` naming the first bad ``privacy.*`` key, if any.

    Examples
    --------
    >>> check_privacy_config(PrivacyConfig(mode="dpsgd", noise_multiplier=1.0))
    """
    _require(privacy.mode in PRIVACY_MODES, "mode", privacy.mode, f"one of {PRIVACY_MODES}")
    _require(privacy.max_grad_norm > 0, "max_grad_norm", privacy.max_grad_norm, "> 0")
    if privacy.mode == "central":
        _require(
            privacy.central_noise_multiplier >= 0,
            "central_noise_multiplier",
            privacy.central_noise_multiplier,
            ">= 0",
        )
    if privacy.mode != "dpsgd":
        return
    _require(
        privacy.accountant in ACCOUNTANTS,
        "accountant",
        privacy.accountant,
        f"one of {tuple(sorted(ACCOUNTANTS))}",
    )
    _require(
        privacy.grad_sample_mode in GRAD_SAMPLE_MODES,
        "grad_sample_mode",
        privacy.grad_sample_mode,
        f"one of {GRAD_SAMPLE_MODES}",
    )
    _require(privacy.max_epsilon > 0, "max_epsilon", privacy.max_epsilon, "> 0")
    if privacy.delta is not None:
        _require(0 < privacy.delta < 1, "delta", privacy.delta, "in (0, 1), or null")
    if (privacy.noise_multiplier is None) == (privacy.target_epsilon is None):
        raise ConfigError(
            "privacy.mode=dpsgd needs exactly one of `privacy.noise_multiplier` and "
            f"`privacy.target_epsilon` (got {privacy.noise_multiplier} and "
            f"{privacy.target_epsilon}); set the other to null"
        )
    if privacy.noise_multiplier is not None:
        _require(privacy.noise_multiplier > 0, "noise_multiplier", privacy.noise_multiplier, "> 0")
    if privacy.target_epsilon is not None:
        _require(privacy.target_epsilon > 0, "target_epsilon", privacy.target_epsilon, "> 0")


def _require(ok: bool, key: str, value: object, rule: str) -> None:
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(
            f"`privacy.{key}` must be {rule} (got {value!r}); set it in conf/privacy/*.yaml "
            f"or on the command line (privacy.{key}=...)"
        )


def resolve_noise_multiplier(
    privacy: PrivacyConfig, *, delta: float, sample_rate: float, planned_steps: int
) -> float:
    """``privacy.noise_multiplier``, or the one that spends ``privacy.target_epsilon``.

    With ``target_epsilon`` the noise is derived (with ``privacy.accountant``) so that
    ``planned_steps`` steps at ``sample_rate`` spend at most ``target_epsilon`` at
    ``delta``: the budget of this run's plan. Earlier runs already in the ledger are
    capped separately by ``privacy.max_epsilon``.

    Parameters
    ----------
    privacy : PrivacyConfig
        The ``privacy`` config group (``mode=dpsgd``).
    delta : float
        The ledger's delta.
    sample_rate : float
        ``1 / steps_per_epoch``.
    planned_steps : int
        Planned rounds x local epochs x steps per epoch.
    """
    check_privacy_config(privacy)
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    assert privacy.target_epsilon is not None  # check_privacy_config guarantees one is set
    return derive_noise_multiplier(
        target_epsilon=float(privacy.target_epsilon),
        delta=delta,
        sample_rate=sample_rate,
        steps=planned_steps,
        accountant=privacy.accountant,
    )


def plan_round(
    *,
    privacy: PrivacyConfig,
    state_dir: Path,
    num_samples: int,
    steps_per_epoch: int,
    local_epochs: int,
    planned_rounds: int,
) -> RoundPlan:
    """Open the site's ledger and check the coming round against ``privacy.max_epsilon``.

    Call it before touching the training data: it needs only the sample count and
    the plain training loader's length.

    Parameters
    ----------
    privacy : PrivacyConfig
        The ``privacy`` config group; ``mode`` must be ``dpsgd``.
    state_dir : Path
        The site's state directory (holds ``ledger.json``).
    num_samples : int
        Local training samples (sets the default delta of a new ledger).
    steps_per_epoch : int
        ``len(train_loader)`` of the ordinary (non-private) loader.
    local_epochs : int
        ``federation.local_epochs``.
    planned_rounds : int
        ``federation.rounds`` (used to derive the noise from ``target_epsilon``).

    Raises
    ------
    PrivacyBudgetExceeded
        If the round would take the site past ``privacy.max_epsilon``.
    ConfigError
        For an invalid ``privacy`` config or one inconsistent with the ledger.

    Examples
    --------
    >>> plan = plan_round(privacy=cfg.privacy, state_dir=site_dir, num_samples=len(train_set),
    ...                   steps_per_epoch=len(loader), local_epochs=2, planned_rounds=30)
    >>> private = make_private(..., noise_multiplier=plan.noise_multiplier, ...)
    >>> # ... train ...
    >>> plan.ledger.charge(server_round=r, run_id=run_id, noise_multiplier=plan.noise_multiplier,
    ...                    sample_rate=private.sample_rate, steps=private.steps)
    """
    if privacy.mode != "dpsgd":
        raise ConfigError(f"`privacy.mode` is {privacy.mode!r}; a DP-SGD round needs dpsgd")
    if steps_per_epoch <= 0 or local_epochs <= 0 or planned_rounds <= 0:
        raise ConfigError(
            f"cannot plan DP-SGD for {planned_rounds} rounds x {local_epochs} local epochs x "
            f"{steps_per_epoch} steps; check federation.rounds / federation.local_epochs "
            "and that the site has training data"
        )
    check_privacy_config(privacy)
    ledger = PrivacyLedger.open(
        state_dir, accountant=privacy.accountant, delta=privacy.delta, num_samples=num_samples
    )
    sample_rate = 1 / steps_per_epoch
    steps = local_epochs * steps_per_epoch
    noise_multiplier = resolve_noise_multiplier(
        privacy, delta=ledger.delta, sample_rate=sample_rate, planned_steps=planned_rounds * steps
    )
    projected = ledger.check_budget(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        max_epsilon=privacy.max_epsilon,
    )
    return RoundPlan(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=ledger.delta,
        spent=ledger.epsilon,
        projected=projected,
        ledger=ledger,
    )
