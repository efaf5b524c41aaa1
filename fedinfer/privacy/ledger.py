"""The persistent privacy ledger of one site: ``<state_dir>/ledger.json``.

The ledger records every DP-SGD charge a site has ever made, across runs and
restarts, and derives the cumulative epsilon by replaying all of them into an
Opacus accountant. Its file format (version 1)::

    {
      "format": "fedinfer-privacy-ledger",
      "version": 1,
      "accountant": "rdp",          # fixed by the first charge
      "delta": 2e-05,               # fixed by the first charge
      "epsilon": 1.93,              # cumulative; a cache for humans, always recomputed
      "entries": [
        {"round": 1, "run_id": "7", "time": "2025-01-01T12:00:00Z",
         "noise_multiplier": 1.1, "sample_rate": 0.0156, "steps": 128,
         "delta": 2e-05, "epsilon_after": 0.41},
        ...
      ]
    }

Rules:

- **Composition over everything.** Epsilon is computed from all entries ever,
  never from the per-run value a freshly created Opacus engine would report.
- **Delta and accountant are fixed by the first charge.** Epsilon at a larger
  delta is smaller, so changing delta mid-history would let a site quietly
  loosen its budget; a different explicit ``privacy.delta`` (or
  ``privacy.accountant``) is refused with a :class:`~fedinfer.errors.ConfigError`.
  Leaving ``privacy.delta`` unset reuses the ledger's delta.
- **Crash safety.** Every save writes a temporary file in the same directory,
  fsyncs it, atomically ``os.replace``-s it over ``ledger.json`` and fsyncs the
  directory: a crash leaves either the old or the new ledger, never a mix.
  Charges take an exclusive ``flock`` and re-read the file first, so two
  processes charging the same site never lose an entry.
- **Reserve, then settle.** A training round first :meth:`PrivacyLedger.reserve`-s its
  planned spend: under the lock, the planned steps are composed with every entry *and
  every open reservation* and refused if over budget, then recorded in ``"reservations"``.
  After training :meth:`~PrivacyLedger.settle` replaces the reservation with the steps
  really taken; a failed training :meth:`~PrivacyLedger.release`-s it. Two concurrent
  trainings can therefore never both pass a budget only one fits. A reservation left by a
  crash stays counted (the data may have been touched): conservative, never a leak.
- **Rollback and deletion (encrypted sites).** Every save bumps the ledger's
  ``"generation"``; an encrypted site also keeps that number in a sealed
  ``ledger.counter`` (written after the ledger). Opening refuses a ledger whose
  generation is below the counter (an older copy put back) and a missing ledger when the
  counter exists (a deleted one). Not detected: rolling back (or deleting) *both* files
  together, e.g. restoring a whole-directory backup; a plaintext site has no counter.
- **No silent reset.** A missing file is a new site; an unreadable, corrupt or
  unknown-format file is a :class:`~fedinfer.errors.PrivacyLedgerError`.
- **Encryption at rest.** With a site key (``key=``, or ``$FEDINFER_STATE_KEY_FILE``
  when no key is passed) the whole file is sealed (:mod:`fedinfer.crypto.at_rest`,
  logical name ``privacy-ledger``), through the same locked, atomic writes; a
  tampered or swapped file is a :class:`~fedinfer.errors.PrivacyLedgerError`, a
  missing or wrong key a :class:`~fedinfer.errors.StateKeyError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedinfer.crypto.at_rest import (
    StateKey,
    check_state_dir,
    open_state,
    reseal_file,
    resolve_state_key,
    seal_state,
)
from fedinfer.errors import ConfigError, PrivacyBudgetExceeded, PrivacyLedgerError
from fedinfer.fsutil import fsync_directory
from fedinfer.privacy.accountant import (
    HistoryEntry,
    create_accountant,
    default_delta,
    epsilon_from_history,
)

__all__ = [
    "COUNTER_FILENAME",
    "LEDGER_FILENAME",
    "LedgerEntry",
    "PrivacyLedger",
    "Reservation",
    "reseal_ledger",
]

LEDGER_FILENAME = "ledger.json"
_FORMAT = "fedinfer-privacy-ledger"
_VERSION = 1
_TMP_PREFIX = f".{LEDGER_FILENAME}."
_TMP_SUFFIX = ".tmp"
_SEALED_NAME = "privacy-ledger"
COUNTER_FILENAME = "ledger.counter"
_COUNTER_NAME = "privacy-ledger-counter"


@dataclass(frozen=True)
class LedgerEntry:
    """One charge: ``steps`` DP-SGD steps at ``noise_multiplier`` and ``sample_rate``."""

    round: int
    run_id: str
    time: str
    """ISO-8601 UTC time of the charge."""
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_after: float | None
    """Cumulative epsilon right after this charge (``None``: unbounded)."""

    @property
    def mechanism(self) -> HistoryEntry:
        """The ``(noise_multiplier, sample_rate, steps)`` triple an accountant composes."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Reservation:
    """Planned spend held against the budget while a round trains (see ``reserve``)."""

    id: str
    round: int
    run_id: str
    time: str
    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def mechanism(self) -> HistoryEntry:
        """The planned ``(noise_multiplier, sample_rate, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """Cumulative (epsilon, delta) of one site, persisted in ``<state_dir>/ledger.json``.

    Build it with :meth:`open` (training: creates a new ledger if none exists)
    or :meth:`read` (inspection: the ledger must exist).

    Examples
    --------
    >>> ledger = PrivacyLedger.open(state_dir, accountant="rdp", delta=None, num_samples=5000)
    >>> ledger.check_budget(noise_multiplier=1.1, sample_rate=0.0064, steps=312, max_epsilon=8.0)
    >>> # ... train ...
    >>> ledger.charge(server_round=3, run_id="42", noise_multiplier=1.1,
    ...               sample_rate=0.0064, steps=311)
    """

    def __init__(
        self,
        *,
        path: Path,
        accountant: str,
        delta: float,
        entries: Sequence[LedgerEntry] = (),
        key: StateKey | None = None,
        reservations: Sequence[Reservation] = (),
    ) -> None:
        create_accountant(accountant)  # validates the name
        self.path = Path(path)
        self.key = key
        self.accountant = accountant
        self.delta = float(delta)
        self._entries: list[LedgerEntry] = list(entries)
        self._reservations: list[Reservation] = list(reservations)
        self._epsilon: float | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def read(cls, state_dir: Path, *, key: StateKey | None = None) -> PrivacyLedger:
        """Load the ledger of ``state_dir``; it must exist.

        ``key`` is the site's state key (default: None, ``$FEDINFER_STATE_KEY_FILE`` if
        set, else a plaintext ledger).

        Raises
        ------
        PrivacyLedgerError
            If the file is missing, unreadable, corrupt or of an unknown format.
        StateKeyError
            If the ledger is encrypted and the key is missing or wrong (or the reverse).
        """
        path = Path(state_dir) / LEDGER_FILENAME
        key = _state_key(Path(state_dir), key)
        _check_generation(path, key)
        if not path.is_file():
            raise PrivacyLedgerError(
                f"no privacy ledger at {path}; a site writes it on its first DP-SGD round "
                "(check the site's state directory)"
            )
        accountant, delta, entries, reservations = _load(path, key)
        return cls(
            path=path,
            accountant=accountant,
            delta=delta,
            entries=entries,
            key=key,
            reservations=reservations,
        )

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        accountant: str,
        delta: float | None,
        num_samples: int,
        key: StateKey | None = None,
    ) -> PrivacyLedger:
        """Load the ledger of ``state_dir``, or start a new one if the site has none yet.

        Parameters
        ----------
        state_dir : Path
            The site's state directory (created if missing).
        accountant : str
            ``privacy.accountant``; must match an existing ledger's.
        delta : float or None
            ``privacy.delta``; ``None`` reuses an existing ledger's delta, or for a new
            ledger takes :func:`~fedinfer.privacy.accountant.default_delta` of ``num_samples``.
        num_samples : int
            The site's local training sample count.
        key : StateKey or None
            The site's state key (default: None, ``$FEDINFER_STATE_KEY_FILE`` if set,
            else a plaintext ledger).

        Raises
        ------
        ConfigError
            If ``delta`` or ``accountant`` differ from the existing ledger's, or ``delta`` is
            not below ``1 / num_samples``.
        PrivacyLedgerError
            If an existing ledger cannot be read.
        """
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / LEDGER_FILENAME
        key = _state_key(state_dir, key)
        if delta is not None:
            _check_delta(delta, num_samples)
        _check_generation(path, key)
        if not path.exists():
            chosen = default_delta(num_samples) if delta is None else delta
            return cls(path=path, accountant=accountant, delta=chosen, key=key)
        ledger = cls.read(state_dir, key=key)
        ledger._require_settings(accountant=accountant, delta=delta)
        return ledger

    # ------------------------------------------------------------------ queries

    def refresh(self) -> None:
        """Re-read the entries from disk (another process may have charged since)."""
        if self.path.exists():
            accountant, delta, entries, reservations = _load(self.path, self.key)
            self._require_same_settings(accountant, delta)
            self._entries, self._reservations, self._epsilon = entries, reservations, None

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """Every charge, oldest first."""
        return tuple(self._entries)

    @property
    def reservations(self) -> tuple[Reservation, ...]:
        """Planned spends of rounds still training (or of trainings that crashed)."""
        return tuple(self._reservations)

    @property
    def history(self) -> list[HistoryEntry]:
        """The entries as an Opacus accountant history."""
        return [entry.mechanism for entry in self._entries]

    @property
    def total_steps(self) -> int:
        """DP-SGD steps ever charged."""
        return sum(entry.steps for entry in self._entries)

    @property
    def epsilon(self) -> float:
        """Cumulative epsilon at :attr:`delta` over all entries (``0.0`` when empty)."""
        if self._epsilon is None:
            self._epsilon = self._epsilon_of(self.history)
        return self._epsilon

    def projected_epsilon(
        self, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Return the cumulative epsilon the site would have after ``steps`` more steps."""
        planned = (noise_multiplier, sample_rate, steps)
        _check_mechanism(planned)
        return self._epsilon_of([*self.history, planned])

    def check_budget(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, max_epsilon: float
    ) -> float:
        """Refuse a round that would push the cumulative epsilon past ``max_epsilon``.

        Call it before touching the training data.

        Returns
        -------
        float
            The projected cumulative epsilon after the round.

        Raises
        ------
        PrivacyBudgetExceeded
            If the projection exceeds ``max_epsilon``.
        """
        if not max_epsilon > 0:
            raise ConfigError(f"`privacy.max_epsilon` must be > 0 (got {max_epsilon})")
        self.refresh()
        planned = (noise_multiplier, sample_rate, steps)
        _check_mechanism(planned)
        held = [r.mechanism for r in self._reservations]
        projected = self._epsilon_of([*self.history, *held, planned])
        if projected > max_epsilon:
            raise self._over_budget(planned, projected, max_epsilon, pending=len(held))
        return projected

    # ------------------------------------------------------------------ charging

    def charge(
        self,
        *,
        server_round: int,
        run_id: str | int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> LedgerEntry:
        """Record ``steps`` DP-SGD steps really taken and save the ledger atomically.

        Re-reads the file under an exclusive lock first, so a charge made by another
        process in the meantime is composed too.

        Returns
        -------
        LedgerEntry
            The new entry, with the cumulative ``epsilon_after``.
        """
        mechanism = (float(noise_multiplier), float(sample_rate), int(steps))
        _check_mechanism(mechanism)
        with _exclusive_lock(self.path):
            entries, reservations = self._reload()
            entry = self._append_entry(entries, reservations, server_round, run_id, mechanism)
        return entry

    def reserve(
        self,
        *,
        server_round: int,
        run_id: str | int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_epsilon: float,
    ) -> tuple[Reservation, float]:
        """Hold a round's planned spend against ``max_epsilon`` before the data is touched.

        Under the exclusive lock: re-read the ledger, compose every entry, every open
        reservation (another training of this site) and the plan; refuse if over budget,
        else record the reservation and save.

        Returns
        -------
        tuple[Reservation, float]
            The reservation to :meth:`settle` (or :meth:`release`) and the projected epsilon.

        Raises
        ------
        PrivacyBudgetExceeded
            If the plan, on top of the entries and open reservations, exceeds ``max_epsilon``.
        """
        if not max_epsilon > 0:
            raise ConfigError(f"`privacy.max_epsilon` must be > 0 (got {max_epsilon})")
        planned = (float(noise_multiplier), float(sample_rate), int(steps))
        _check_mechanism(planned)
        with _exclusive_lock(self.path):
            entries, reservations = self._reload()
            self._entries, self._reservations, self._epsilon = entries, reservations, None
            held = [r.mechanism for r in reservations]
            projected = self._epsilon_of([*self.history, *held, planned])
            if projected > max_epsilon:
                raise self._over_budget(planned, projected, max_epsilon, pending=len(held))
            reservation = Reservation(
                id=os.urandom(8).hex(),
                round=int(server_round),
                run_id=str(run_id),
                time=_now(),
                noise_multiplier=planned[0],
                sample_rate=planned[1],
                steps=planned[2],
            )
            self._reservations = [*reservations, reservation]
            self._save(entries, self.epsilon)
        return reservation, projected

    def settle(
        self, reservation: Reservation, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> LedgerEntry:
        """Replace ``reservation`` with the steps really taken (one atomic save).

        Raises
        ------
        PrivacyLedgerError
            If the reservation is no longer in the ledger (an older copy was restored).
        """
        mechanism = (float(noise_multiplier), float(sample_rate), int(steps))
        _check_mechanism(mechanism)
        with _exclusive_lock(self.path):
            entries, reservations = self._reload()
            remaining = [r for r in reservations if r.id != reservation.id]
            if len(remaining) == len(reservations):
                raise PrivacyLedgerError(
                    f"the privacy ledger {self.path} lost the reservation of round "
                    f"{reservation.round} while it trained (was an older copy restored?); "
                    "the round's spend is charged anyway"
                )
            return self._append_entry(
                entries, remaining, reservation.round, reservation.run_id, mechanism
            )

    def release(self, reservation: Reservation) -> None:
        """Drop a reservation whose training failed before any noisy step was released."""
        with _exclusive_lock(self.path):
            entries, reservations = self._reload()
            self._reservations = [r for r in reservations if r.id != reservation.id]
            self._entries, self._epsilon = entries, None
            self._save(entries, self.epsilon)

    def _reload(self) -> tuple[list[LedgerEntry], list[Reservation]]:
        """Entries and reservations as saved (call under the lock)."""
        _check_generation(self.path, self.key)
        if not self.path.exists():
            return list(self._entries), list(self._reservations)
        accountant, delta, entries, reservations = _load(self.path, self.key)
        self._require_same_settings(accountant, delta)
        return entries, reservations

    def _append_entry(
        self,
        entries: list[LedgerEntry],
        reservations: list[Reservation],
        server_round: int,
        run_id: str | int,
        mechanism: HistoryEntry,
    ) -> LedgerEntry:
        history = [*(e.mechanism for e in entries), mechanism]
        epsilon_after = self._epsilon_of(history)
        entry = LedgerEntry(
            round=int(server_round),
            run_id=str(run_id),
            time=_now(),
            noise_multiplier=mechanism[0],
            sample_rate=mechanism[1],
            steps=mechanism[2],
            delta=self.delta,
            epsilon_after=_finite_or_none(epsilon_after),
        )
        # Only a saved charge changes what this object reports.
        previous = self._reservations
        self._reservations = reservations
        try:
            self._save([*entries, entry], epsilon_after)
        except BaseException:
            self._reservations = previous
            raise
        self._entries, self._epsilon = [*entries, entry], epsilon_after
        return entry

    def _over_budget(
        self, planned: HistoryEntry, projected: float, max_epsilon: float, *, pending: int = 0
    ) -> PrivacyBudgetExceeded:
        noise_multiplier, sample_rate, steps = planned
        held = f", {pending} round(s) of this site still training" if pending else ""
        return PrivacyBudgetExceeded(
            f"training this round ({steps} steps, noise_multiplier={noise_multiplier:.4g}, "
            f"sample_rate={sample_rate:.4g}) would bring the site to epsilon={projected:.4g} "
            f"at delta={self.delta:.3g} (spent so far: {self.epsilon:.4g}{held}), over "
            f"`privacy.max_epsilon`={max_epsilon:g}; the site stops training. Raise the "
            "budget only if your privacy policy allows it, or add noise "
            "(`privacy.noise_multiplier`)",
            spent=self.epsilon,
            projected=projected,
            budget=max_epsilon,
        )

    # ------------------------------------------------------------------ internals

    def _epsilon_of(self, history: list[HistoryEntry]) -> float:
        return epsilon_from_history(history, delta=self.delta, accountant=self.accountant)

    def _require_settings(self, *, accountant: str, delta: float | None) -> None:
        """Refuse to mix accountants or deltas within one ledger's history."""
        if accountant != self.accountant:
            raise ConfigError(
                f"`privacy.accountant` is {accountant!r} but the ledger {self.path} uses "
                f"{self.accountant!r}; a site keeps one accountant for its whole history: "
                "set privacy.accountant to the ledger's"
            )
        if delta is not None and delta != self.delta:
            raise ConfigError(
                f"`privacy.delta` is {delta!r} but the ledger {self.path} was started with "
                f"delta={self.delta!r}; changing delta mid-history would change what the budget "
                "means: leave privacy.delta unset (or set it to the ledger's)"
            )

    def _require_same_settings(self, accountant: str, delta: float) -> None:
        if (accountant, delta) != (self.accountant, self.delta):
            raise PrivacyLedgerError(
                f"the ledger {self.path} was rewritten by another process with "
                f"accountant={accountant!r}, delta={delta!r} (this process uses "
                f"{self.accountant!r}, {self.delta!r}); nothing was charged: rerun the site"
            )

    def _save(self, entries: list[LedgerEntry], epsilon: float) -> None:
        """Write atomically: temp file in the same directory, fsync, replace, fsync the dir."""
        generation = _generation(self.path, self.key) + 1
        document = {
            "format": _FORMAT,
            "version": _VERSION,
            "generation": generation,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon": _finite_or_none(epsilon),
            "entries": [asdict(entry) for entry in entries],
            "reservations": [asdict(r) for r in self._reservations],
        }
        payload = json.dumps(document, indent=2, allow_nan=False).encode() + b"\n"
        payload = seal_state(payload, key=self.key, name=_SEALED_NAME)
        fd, tmp_name = tempfile.mkstemp(
            prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=self.path.parent
        )
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(payload)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        fsync_directory(self.path.parent)
        if self.key is not None:
            _write_counter(self.path, self.key, generation)


def reseal_ledger(state_dir: Path, *, old: StateKey | None, new: StateKey) -> bool:
    """Re-encrypt ``<state_dir>/ledger.json`` from ``old`` (None: plaintext) to ``new``.

    Under the ledger's lock and atomic like a charge; a ledger already sealed with
    ``new`` is left as is. Returns whether the file was rewritten (False: no ledger
    or nothing to do).
    """
    path = Path(state_dir) / LEDGER_FILENAME
    if not path.is_file():
        return False
    with _exclusive_lock(path):
        if old is not None:
            _check_generation(path, old)
        changed = reseal_file(
            path, name=_SEALED_NAME, old=old, new=new, tampered=PrivacyLedgerError
        )
        if changed:  # the counter follows the ledger to the new key
            _write_counter(path, new, _generation(path, new))
        return changed


# ---------------------------------------------------------------------- file helpers


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<ledger>.lock``; tidy temp files left by crashes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            for stale in path.parent.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
                stale.unlink(missing_ok=True)  # only a crashed writer leaves these
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _generation(path: Path, key: StateKey | None) -> int:
    """The ``generation`` saved in the ledger at ``path`` (0: none yet, or an old file)."""
    if not path.exists():
        return 0
    plain = open_state(
        path.read_bytes(), key=key, name=_SEALED_NAME, source=path, tampered=PrivacyLedgerError
    )
    try:
        value = json.loads(plain).get("generation", 0)
    except (ValueError, AttributeError) as err:
        raise PrivacyLedgerError(f"the privacy ledger {path} is corrupt ({err})") from err
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PrivacyLedgerError(f"the privacy ledger {path} has a bad generation {value!r}")
    return value


def _read_counter(path: Path, key: StateKey) -> int | None:
    counter = path.with_name(COUNTER_FILENAME)
    if not counter.exists():
        return None
    plain = open_state(
        counter.read_bytes(),
        key=key,
        name=_COUNTER_NAME,
        source=counter,
        tampered=PrivacyLedgerError,
    )
    try:
        return int(json.loads(plain)["generation"])
    except (ValueError, KeyError, TypeError) as err:
        raise PrivacyLedgerError(f"the ledger counter {counter} is corrupt ({err})") from err


def _write_counter(path: Path, key: StateKey, generation: int) -> None:
    counter = path.with_name(COUNTER_FILENAME)
    payload = seal_state(
        json.dumps({"generation": generation}).encode(), key=key, name=_COUNTER_NAME
    )
    tmp = counter.with_name(f".{COUNTER_FILENAME}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, counter)
    fsync_directory(path.parent)


def _check_generation(path: Path, key: StateKey | None) -> None:
    """Refuse a deleted or older ledger of an encrypted site (its sealed counter is ahead)."""
    if key is None:
        return
    expected = _read_counter(path, key)
    if expected is None:
        # A ledger this code saved twice or more under a key has a counter (the first save
        # may have crashed before writing it): a missing one was deleted.
        if path.exists() and _generation(path, key) >= 2:
            raise PrivacyLedgerError(
                f"the sealed ledger counter {path.with_name(COUNTER_FILENAME)} is missing; "
                "without it a rolled-back ledger would go unnoticed: restore it"
            )
        return
    if not path.exists():
        raise PrivacyLedgerError(
            f"the privacy ledger {path} is missing but its sealed counter says generation "
            f"{expected} was written: the ledger was deleted; restore the latest copy "
            "(a fresh ledger would reset the site's privacy budget)"
        )
    found = _generation(path, key)
    if found < expected:
        raise PrivacyLedgerError(
            f"the privacy ledger {path} is an older copy (generation {found}, the sealed "
            f"counter says {expected}): it would hide spent budget; restore the latest copy"
        )


def _state_key(state_dir: Path, key: StateKey | None) -> StateKey | None:
    """``key``, else the one ``$FEDINFER_STATE_KEY_FILE`` names, checked against the marker.

    A state dir marked as encrypted refuses another key, and refuses no key at all.
    """
    if key is None:
        key = resolve_state_key(None, protects=[state_dir])
    check_state_dir(state_dir, key)
    return key


def _load(
    path: Path, key: StateKey | None
) -> tuple[str, float, list[LedgerEntry], list[Reservation]]:
    """Parse and validate a ledger file; any problem is a PrivacyLedgerError."""
    fix = "restore it from a backup; never delete it, that would reset the site's privacy budget"
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise PrivacyLedgerError(f"cannot read the privacy ledger {path} ({err}); {fix}") from err
    plain = open_state(blob, key=key, name=_SEALED_NAME, source=path, tampered=PrivacyLedgerError)
    try:
        raw = json.loads(plain)
    except ValueError as err:
        raise PrivacyLedgerError(f"cannot read the privacy ledger {path} ({err}); {fix}") from err
    try:
        return _parse(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise PrivacyLedgerError(f"the privacy ledger {path} is corrupt ({err}); {fix}") from err


def _parse(raw: Any) -> tuple[str, float, list[LedgerEntry], list[Reservation]]:
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        raise ValueError(f"not a fedinfer privacy ledger (expected format {_FORMAT!r})")
    if raw.get("version") != _VERSION:
        raise ValueError(f"unknown ledger version {raw.get('version')!r} (this fedinfer reads 1)")
    accountant = _typed(raw, "accountant", str)
    create_accountant(accountant)
    delta = _typed(raw, "delta", float)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta {delta} is not in (0, 1)")
    entries = [_parse_entry(item) for item in _typed(raw, "entries", list)]
    if any(entry.delta != delta for entry in entries):
        raise ValueError("an entry's delta differs from the ledger's")
    reservations = [_parse_reservation(item) for item in raw.get("reservations", [])]
    return accountant, delta, entries, reservations


def _parse_reservation(item: Any) -> Reservation:
    if not isinstance(item, dict):
        raise TypeError(f"a reservation is {type(item).__name__}, not an object")
    reservation = Reservation(
        id=_typed(item, "id", str),
        round=_typed(item, "round", int),
        run_id=_typed(item, "run_id", str),
        time=_iso_time(_typed(item, "time", str)),
        noise_multiplier=_typed(item, "noise_multiplier", float),
        sample_rate=_typed(item, "sample_rate", float),
        steps=_typed(item, "steps", int),
    )
    _check_mechanism(reservation.mechanism)
    return reservation


def _parse_entry(item: Any) -> LedgerEntry:
    if not isinstance(item, dict):
        raise TypeError(f"an entry is {type(item).__name__}, not an object")
    epsilon_after = item.get("epsilon_after")
    entry = LedgerEntry(
        round=_typed(item, "round", int),
        run_id=_typed(item, "run_id", str),
        time=_iso_time(_typed(item, "time", str)),
        noise_multiplier=_typed(item, "noise_multiplier", float),
        sample_rate=_typed(item, "sample_rate", float),
        steps=_typed(item, "steps", int),
        delta=_typed(item, "delta", float),
        epsilon_after=None if epsilon_after is None else _typed(item, "epsilon_after", float),
    )
    _check_mechanism(entry.mechanism)
    return entry


def _typed(obj: dict[str, Any], key: str, kind: type) -> Any:
    """``obj[key]`` checked against ``kind`` (ints count as floats, bools as neither)."""
    value = obj[key]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok or (kind is float and not math.isfinite(value)):
        raise TypeError(f"{key!r} is {value!r}, expected {kind.__name__}")
    return value


def _iso_time(value: str) -> str:
    datetime.fromisoformat(value)  # raises ValueError if it is not ISO-8601
    return value


def _check_mechanism(mechanism: HistoryEntry) -> None:
    noise_multiplier, sample_rate, steps = mechanism
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ConfigError(f"`privacy.noise_multiplier` must be > 0 (got {noise_multiplier})")
    if not 0.0 < sample_rate <= 1.0:
        raise ConfigError(f"a DP-SGD sample rate must be in (0, 1] (got {sample_rate})")
    if steps < 0:
        raise ConfigError(f"DP-SGD steps must be >= 0 (got {steps})")


def _check_delta(delta: float, num_samples: int) -> None:
    if not 0.0 < delta < 1.0 / max(num_samples, 1):
        raise ConfigError(
            f"`privacy.delta`={delta} must be in (0, 1/n) for a site with n={num_samples} "
            f"training samples (a delta of 1/n allows leaking one record outright); "
            "leave it unset for the default 1/(10 n)"
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
