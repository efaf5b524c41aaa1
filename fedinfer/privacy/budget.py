"""From the ``privacy`` config to a checked DP-SGD round: noise and budget.

A site's train handler calls :func:`plan_round` before it touches its data, trains
with :func:`~fedinfer.privacy.dpsgd.make_private` using the plan's noise multiplier,
then charges ``plan.ledger`` with the steps really taken.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedinfer.config.schema import PrivacyConfig
from fedinfer.config.validate import PRIVACY_MODES, validate_privacy
from fedinfer.errors import ConfigError
from fedinfer.privacy.accountant import derive_noise_multiplier
from fedinfer.privacy.ledger import PrivacyLedger, Reservation

__all__ = [
    "PRIVACY_MODES",
    "RoundPlan",
    "plan_round",
    "resolve_noise_multiplier",
]


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
    reservation: Reservation | None = None
    """The planned spend held in the ledger (when planned for a ``server_round``): settle it
    after training with :meth:`PrivacyLedger.settle`, or release it if training failed."""


def resolve_noise_multiplier(
    privacy: PrivacyConfig, *, delta: float, sample_rate: float, planned_steps: int
) -> float:
    """The noise that spends ``privacy.target_epsilon`` over the plan, else ``noise_multiplier``.

    A target takes precedence over ``privacy.noise_multiplier``: the noise is derived
    (with ``privacy.accountant``) so that ``planned_steps`` steps at ``sample_rate`` spend at
    most ``target_epsilon`` at ``delta``, so each site derives its own noise from its own
    sample rate and ``privacy.target_epsilon=8`` works on its own. Earlier runs already in
    the ledger are capped separately by ``privacy.max_epsilon``.

    Parameters
    ----------
    privacy : PrivacyConfig
        The ``privacy`` config group (``mode=dpsgd``, checked by ``validate_privacy``).
    delta : float
        The ledger's delta.
    sample_rate : float
        ``1 / steps_per_epoch``.
    planned_steps : int
        Planned rounds x local epochs x steps per epoch.
    """
    if privacy.target_epsilon is None:
        assert privacy.noise_multiplier is not None  # validate_privacy guarantees one is set
        return float(privacy.noise_multiplier)
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
    ledger: PrivacyLedger,
    steps_per_epoch: int,
    local_epochs: int,
    planned_rounds: int,
    server_round: int | None = None,
    run_id: str | None = None,
) -> RoundPlan:
    """Check the coming round against the site's ledger and ``privacy.max_epsilon``.

    Call it before touching the training data: it needs only the site's ledger and the
    plain training loader's length. Nothing is charged: the caller charges
    ``plan.ledger`` with the steps really taken after training.

    Parameters
    ----------
    privacy : PrivacyConfig
        The ``privacy`` config group; ``mode`` must be ``dpsgd``.
    ledger : PrivacyLedger
        The site's open ledger (:meth:`PrivacyLedger.open`).
    steps_per_epoch : int
        ``len(train_loader)`` of the ordinary (non-private) loader.
    local_epochs : int
        ``federation.local_epochs``.
    planned_rounds : int
        ``federation.rounds`` (used to derive the noise from ``target_epsilon``).
    server_round, run_id : int, str, optional
        When given, the planned spend is *reserved* in the ledger under its lock
        (:meth:`PrivacyLedger.reserve`), so a concurrent training of the same site cannot
        pass the same budget; else only checked (nothing recorded).

    Raises
    ------
    PrivacyBudgetExceeded
        If the round would take the site past ``privacy.max_epsilon``.
    ConfigError
        For an invalid ``privacy`` config or one inconsistent with the ledger.

    Examples
    --------
    >>> ledger = PrivacyLedger.open(site_dir, accountant="rdp", delta=None, num_samples=2000)
    >>> plan = plan_round(privacy=cfg.privacy, ledger=ledger, steps_per_epoch=len(loader),
    ...                   local_epochs=2, planned_rounds=30)
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
    validate_privacy(privacy)
    sample_rate = 1 / steps_per_epoch
    steps = local_epochs * steps_per_epoch
    noise_multiplier = resolve_noise_multiplier(
        privacy, delta=ledger.delta, sample_rate=sample_rate, planned_steps=planned_rounds * steps
    )
    reservation: Reservation | None = None
    if server_round is None:
        projected = ledger.check_budget(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            max_epsilon=privacy.max_epsilon,
        )
    else:
        reservation, projected = ledger.reserve(
            server_round=server_round,
            run_id="" if run_id is None else run_id,
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
        reservation=reservation,
    )
