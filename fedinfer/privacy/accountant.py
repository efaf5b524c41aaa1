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
from typing import Any

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedinfer.errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "RDP_ORDERS",
    "HistoryEntry",
    "create_accountant",
    "default_delta",
    "derive_noise_multiplier",
    "epsilon_from_history",
    "merge_history",
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

_EPSILON_KWARGS: dict[str, dict[str, Any]] = {"rdp": {"alphas": list(RDP_ORDERS)}, "prv": {}}


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
        ``rdp`` (Renyi DP over :data:`RDP_ORDERS`) or ``prv`` (Gopi et al.'s
        numerical composition; tighter, returns its certified upper bound).

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
    merged = merge_history(history)
    if not merged:
        return 0.0
    engine = create_accountant(accountant)
    engine.history = merged
    with _quiet_order_warning():
        return float(engine.get_epsilon(delta=delta, **_EPSILON_KWARGS[accountant]))


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
    planned rounds x local epochs x steps per epoch. Results are cached because every
    round of a run asks the same question.

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
        If the budget cannot be met with any noise multiplier Opacus will search.

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
    try:
        with _quiet_order_warning():
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=epsilon_tolerance,
                    **_EPSILON_KWARGS[accountant],
                )
            )
    except ValueError as err:
        raise ConfigError(
            f"`privacy.target_epsilon`={target_epsilon} cannot be reached in {steps} steps at "
            f"sample rate {sample_rate:.4g} ({err}); raise it, train fewer rounds/epochs, "
            "or set `privacy.noise_multiplier` instead"
        ) from err


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
