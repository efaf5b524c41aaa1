"""``fedinfer privacy show``: the ledger rendered as a table with its totals."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from fedinfer.errors import PrivacyLedgerError
from fedinfer.privacy import PrivacyLedger, print_ledger, show_ledger


def test_the_table_lists_every_charge_and_the_cumulative_totals(tmp_path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5, num_samples=5000)
    for server_round, run_id in [(1, "run-a"), (2, "run-a"), (1, "run-b")]:
        ledger.charge(
            server_round=server_round,
            run_id=run_id,
            noise_multiplier=1.1,
            sample_rate=0.0123,
            steps=40,
        )
    # Execute
    text = show_ledger(tmp_path)
    # Assert
    assert text.count("run-a") == 2 and text.count("run-b") == 1
    assert "0.0123" in text and "1.1" in text
    assert f"epsilon = {ledger.epsilon:.4f} at delta = 1e-05" in text
    assert "rdp accountant, composed over 3 charges, 2 runs, 120 steps" in text
    assert show_ledger(tmp_path / "ledger.json") == text


def test_one_charge_of_one_run_is_counted_in_the_singular(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5, num_samples=5000)
    ledger.charge(server_round=1, run_id="r", noise_multiplier=1.1, sample_rate=0.01, steps=1)
    assert "composed over 1 charge, 1 run, 1 step)" in show_ledger(tmp_path)


def test_print_ledger_writes_to_the_console(tmp_path: Path) -> None:
    # Prepare
    PrivacyLedger.open(tmp_path, accountant="prv", delta=None, num_samples=100).charge(
        server_round=1, run_id="r", noise_multiplier=2.0, sample_rate=0.1, steps=10
    )
    console = Console(record=True, width=150)
    # Execute
    print_ledger(tmp_path, console)
    # Assert
    assert "prv accountant" in console.export_text()


@pytest.mark.parametrize("content", [None, "{not json"], ids=["missing", "corrupt"])
def test_a_missing_or_corrupt_ledger_is_a_fedinfer_error(
    tmp_path: Path, content: str | None
) -> None:
    if content is not None:
        (tmp_path / "ledger.json").write_text(content)
    with pytest.raises(PrivacyLedgerError):
        print_ledger(tmp_path, Console(record=True))
