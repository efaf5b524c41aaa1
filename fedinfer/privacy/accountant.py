"""Privacy accounting: a name -> Opacus accountant registry and pure epsilon functions.

A DP-SGD history is a list of ``(noise_multiplier, sample_rate, steps)`` triples,
the exact shape of an Opacus accountant's ``history``. Everything here is a pure
function of such a history, so the cumulative epsilon of a site is always
recomputed from its whole ledger rather than trusted from a stored number.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

from fedinfer.errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "PRV_MAX_GRID_POINTS",
    "RDP_ORDERS",
    "HistoryEntry",
    "create_accountant",
    "default_delta",
    "derive_noise_multiplier",
    "epsilon_from_history",
    "merge_history",
    "prv_epsilon",
]

HistoryEntry = tuple[float, float, int]
"""One homogeneous stretch of DP-SGD: ``(noise_multiplier, sample_rate, steps)``."""

ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}
"""Accountants a site may use, by the name ``privacy.accountant`` takes."""

RDP_ORDERS: tuple[float, ...] = tuple(
    sorted({*RDPAccountant.DEFAULT_ALPHAS, 11, 128, 256, 512, 1024})
)
"""RDP orders searched for the best conversion to (epsilon, delta).

Opacus's defaults (1.1 ... 63) plus 11 and 128 ... 1024, i.e. exactly Google
dp-accounting's defaults: the large orders tighten the bound at small epsilon,
where Opacus's would stop at the last order (more orders never loosen it)."""

PRV_MAX_GRID_POINTS = 2_000_000
"""Largest PRV discretization grid evaluated as is (~300 MB, ~3 s); see :func:`prv_epsilon`."""

_PRV_EPS_ERROR = 0.01  # Opacus's default precision
_PRV_MAX_EPS_ERROR = 0.5  # coarser than this, the RDP bound is as good: use it
_MAX_SIGMA = 1e6  # as Opacus's get_noise_multiplier


@contextmanager
def _quiet_order_warning() -> Iterator[None]:
    """Silence Opacus's "optimal order is the smallest/largest alpha" warning.

    It means the bound may be looser than the orders' range allows, never invalid;
    with :data:`RDP_ORDERS` it only fires at epsilons far outside any sane budget.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


def create_accountant(name: str) -> IAccountant:
    """Return a fresh Opacus accountant for ``name`` (``rdp`` or ``prv``).

    Raises
    ------
    ConfigError
        If ``name`` is not a registered accountant.
    """
    cls = ACCOUNTANTS.get(name)
    if cls is None:
        raise ConfigError(
            f"`privacy.accountant` is {name!r}; choose one of {', '.join(sorted(ACCOUNTANTS))} "
            "(e.g. privacy.accountant=rdp)"
        )
    return cls()


def merge_history(history: Iterable[HistoryEntry]) -> list[HistoryEntry]:
    """Merge entries with the same ``(noise_multiplier, sample_rate)``, summing their steps.

    Composition is commutative, so merging *all* identical mechanisms (not only
    consecutive ones) gives exactly the same epsilon while keeping the PRV
    accountant's cost proportional to the number of distinct mechanisms rather
    than to the number of rounds. Entries with zero steps are dropped; the
    first occurrence fixes each mechanism's position.

    Examples
    --------
    >>> merge_history([(1.0, 0.1, 5), (1.2, 0.1, 3), (1.0, 0.1, 5)])
    [(1.0, 0.1, 10), (1.2, 0.1, 3)]
    """
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    for noise_multiplier, sample_rate, steps in history:
        if steps > 0:
            key = (float(noise_multiplier), float(sample_rate))
            steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + int(steps)
    return [(nm, q, steps) for (nm, q), steps in steps_by_mechanism.items()]


def epsilon_from_history(
    history: Sequence[HistoryEntry], *, delta: float, accountant: str
) -> float:
    """Epsilon at ``delta`` of the composition of every entry in ``history``.

    Parameters
    ----------
    history : sequence of (noise_multiplier, sample_rate, steps)
        Everything the data has ever been used for; order does not matter.
    delta : float
        Target delta, in (0, 1).
    accountant : str
        ``rdp`` (Renyi DP over :data:`RDP_ORDERS`) or ``prv`` (Gopi et al.'s numerical
        composition: tighter; see :func:`prv_epsilon` for its cost guard).

    Returns
    -------
    float
        The cumulative epsilon; ``0.0`` for an empty history.

    Examples
    --------
    >>> round(epsilon_from_history([(1.1, 256 / 60000, 14062)], delta=1e-5, accountant="rdp"), 4)
    2.5966
    """
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"`privacy.delta` must be in (0, 1) (got {delta})")
    create_accountant(accountant)  # name check with a ConfigError
    merged = merge_history(history)
    if not merged:
        return 0.0
    if accountant == "prv":
        return prv_epsilon(merged, delta=delta)
    return _rdp_epsilon(merged, delta=delta)


def _rdp_epsilon(merged: list[HistoryEntry], *, delta: float) -> float:
    engine = RDPAccountant()
    engine.history = merged
    with _quiet_order_warning():
        return float(engine.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))


def prv_epsilon(
    merged: list[HistoryEntry], *, delta: float, max_grid_points: float = PRV_MAX_GRID_POINTS
) -> float:
    """PRV accountant epsilon, with its cost bounded; never above the RDP epsilon.

    Opacus's PRV accountant discretizes the privacy loss on a grid whose size grows
    with the square root of the total steps and with epsilon itself: a site with 10^5
    steps needs ~4 million points, ~7 s and ~650 MB per evaluation, and a badly
    planned round (epsilon in the hundreds) can exhaust the memory. So the grid is
    capped at ``max_grid_points`` by coarsening ``eps_error`` (the result stays a
    certified upper bound, only looser by at most ``eps_error``), and the RDP
    epsilon, also a valid upper bound, is returned whenever it is smaller.

    Parameters
    ----------
    merged : list of (noise_multiplier, sample_rate, steps)
        A merged history (see :func:`merge_history`), not empty.
    delta : float
        Target delta.
    max_grid_points : float
        Cap on the discretization grid (default: :data:`PRV_MAX_GRID_POINTS`).
    """
    rdp_epsilon = _rdp_epsilon(merged, delta=delta)
    delta_error = delta / 1000  # Opacus's default
    with _quiet_order_warning():
        points = _prv_grid_points(merged, eps_error=_PRV_EPS_ERROR, delta_error=delta_error)
    eps_error = _PRV_EPS_ERROR * max(1.0, points / max_grid_points)
    if eps_error > _PRV_MAX_EPS_ERROR:
        return rdp_epsilon
    engine = PRVAccountant()
    engine.history = merged
    # Opacus evaluates log(1 - q), which is -inf (harmlessly) at sample rate 1.
    with _quiet_order_warning(), np.errstate(divide="ignore"):
        epsilon = float(engine.get_epsilon(delta=delta, eps_error=eps_error))
    return min(epsilon, rdp_epsilon) if math.isfinite(epsilon) else rdp_epsilon


def _prv_grid_points(merged: list[HistoryEntry], *, eps_error: float, delta_error: float) -> float:
    """Grid size Opacus's PRVAccountant would use (mirrors ``PRVAccountant._get_domain``)."""
    prvs = [PoissonSubsampledGaussianPRV(q, nm) for nm, q, _ in merged]
    steps = [n for _, _, n in merged]
    half_width = float(
        compute_safe_domain_size(prvs, steps, eps_error=eps_error, delta_error=delta_error)
    )
    mesh = eps_error / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


@functools.lru_cache(maxsize=64)
def derive_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) that spends at most ``target_epsilon``.

    The budget covers ``steps`` DP-SGD steps at ``sample_rate``: for a federation,
    planned rounds x local epochs x steps per epoch. The bisection is Opacus's
    ``get_noise_multiplier``, evaluated with :func:`epsilon_from_history` so that it
    uses the same orders and PRV cost guard as the ledger. Results are cached because
    every round of a run asks the same question.

    Parameters
    ----------
    target_epsilon : float
        Epsilon the planned steps may spend.
    delta : float
        Target delta.
    sample_rate : float
        Poisson sampling rate the data loader really uses (``1 / len(loader)``).
    steps : int
        Number of optimizer steps planned.
    accountant : str
        ``rdp`` or ``prv``.
    epsilon_tolerance : float
        Precision of the binary search (default: 0.01).

    Raises
    ------
    ConfigError
        If the budget cannot be met with a noise multiplier up to 10^6.

    Examples
    --------
    >>> sigma = derive_noise_multiplier(
    ...     target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000, accountant="rdp")
    >>> 0.5 < sigma < 2.0
    True
    """
    create_accountant(accountant)  # name check with a ConfigError
    if target_epsilon <= 0 or not math.isfinite(target_epsilon):
        raise ConfigError(f"`privacy.target_epsilon` must be > 0 (got {target_epsilon})")
    if steps <= 0 or not 0.0 < sample_rate <= 1.0:
        raise ConfigError(f"cannot plan DP-SGD for {steps} steps at sample rate {sample_rate}")

    def spent(sigma: float) -> float:
        return epsilon_from_history(
            [(sigma, sample_rate, steps)], delta=delta, accountant=accountant
        )

    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        if sigma_high > _MAX_SIGMA:
            raise ConfigError(
                f"`privacy.target_epsilon`={target_epsilon} cannot be reached in {steps} steps "
                f"at sample rate {sample_rate:.4g} with any noise multiplier up to {_MAX_SIGMA:g}; "
                "raise it, train fewer rounds/epochs, or set `privacy.noise_multiplier` instead"
            )
        eps_high = spent(sigma_high)
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = spent(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def default_delta(num_samples: int) -> float:
    """Return the default delta of a site with ``num_samples`` training records: ``1 / (10 n)``.

    Why: an (epsilon, delta) guarantee allows a total failure with probability about
    delta; the mechanism "publish one random record in full" is (0, 1/n)-DP, so any
    useful delta must be well below ``1 / n`` (Dwork & Roth, "The Algorithmic
    Foundations of Differential Privacy", sec. 2.3; the Opacus tutorials likewise
    require delta < 1/n). ``1 / (10 n)`` keeps a factor-10 margin below that bound,
    while keeping epsilon meaningful for the small sites typical of a federation
    (``delta`` enters epsilon only through ``log(1 / delta)``, so the margin costs little).

    Examples
    --------
    >>> default_delta(5000)
    2e-05
    """
    if num_samples <= 0:
        raise ConfigError(f"a DP-SGD site needs training samples (got {num_samples})")
    return 1.0 / (10 * num_samples)
