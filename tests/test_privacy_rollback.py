"""Issue 11 item 5: an encrypted site refuses a deleted or rolled-back privacy ledger.

On the old code both attacks silently reset (or lowered) the site's spent budget.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedinfer.crypto.at_rest import StateKey
from fedinfer.errors import PrivacyLedgerError
from fedinfer.privacy import PrivacyLedger
from fedinfer.privacy.ledger import LEDGER_FILENAME

ROUND = dict(noise_multiplier=1.1, sample_rate=0.01, steps=50)


@pytest.fixture
def key(tmp_path: Path) -> StateKey:
    state_key = StateKey.generate()
    state_key.save(tmp_path / "keys" / "site.key")
    return state_key


def _open(state_dir: Path, key: StateKey | None) -> PrivacyLedger:
    return PrivacyLedger.open(state_dir, accountant="rdp", delta=1e-5, num_samples=1000, key=key)


def _charge(state_dir: Path, key: StateKey | None, server_round: int) -> PrivacyLedger:
    ledger = _open(state_dir, key)
    ledger.charge(server_round=server_round, run_id="r", **ROUND)  # type: ignore[arg-type]
    return ledger


def test_an_older_copy_of_the_ledger_is_rejected(tmp_path: Path, key: StateKey) -> None:
    state = tmp_path / "state"
    _charge(state, key, 1)
    shutil.copy(state / LEDGER_FILENAME, tmp_path / "old-ledger")
    _charge(state, key, 2)
    shutil.copy(tmp_path / "old-ledger", state / LEDGER_FILENAME)  # the rollback
    with pytest.raises(PrivacyLedgerError, match="older copy"):
        _open(state, key)
    with pytest.raises(PrivacyLedgerError, match="older copy"):
        PrivacyLedger.read(state, key=key)


def test_a_deleted_ledger_is_refused_not_a_fresh_budget(tmp_path: Path, key: StateKey) -> None:
    state = tmp_path / "state"
    _charge(state, key, 1)
    (state / LEDGER_FILENAME).unlink()
    with pytest.raises(PrivacyLedgerError, match="missing"):
        _open(state, key)


def test_the_current_ledger_still_opens_and_charges(tmp_path: Path, key: StateKey) -> None:
    state = tmp_path / "state"
    for server_round in (1, 2, 3):
        _charge(state, key, server_round)
    assert len(_open(state, key).entries) == 3


def test_a_deleted_counter_is_refused_once_the_ledger_has_one(
    tmp_path: Path, key: StateKey
) -> None:
    from fedinfer.privacy.ledger import COUNTER_FILENAME

    state = tmp_path / "state"
    _charge(state, key, 1)
    _charge(state, key, 2)
    (state / COUNTER_FILENAME).unlink()
    with pytest.raises(PrivacyLedgerError, match="counter"):
        _open(state, key)


def test_a_plaintext_site_has_no_counter(tmp_path: Path) -> None:
    from fedinfer.privacy.ledger import COUNTER_FILENAME

    state = tmp_path / "state"
    _charge(state, None, 1)
    assert not (state / COUNTER_FILENAME).exists()


def test_show_names_open_reservations(tmp_path: Path) -> None:
    from fedinfer.privacy.report import show_ledger

    state = tmp_path / "state"
    ledger = _charge(state, None, 1)
    ledger.reserve(server_round=2, run_id="r", max_epsilon=100.0, **ROUND)  # type: ignore[arg-type]
    assert "1 open reservation (rounds training" in " ".join(show_ledger(state).split())
