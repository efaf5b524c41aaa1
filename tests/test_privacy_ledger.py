"""The site's persistent privacy ledger: format, composition across restarts, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fedinfer.errors import ConfigError, PrivacyBudgetExceeded, PrivacyLedgerError
from fedinfer.privacy import LEDGER_FILENAME, PrivacyLedger, epsilon_from_history

ROOT = Path(__file__).resolve().parents[1]
ROUND = {"noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 100}


def open_ledger(state_dir: Path, **overrides: object) -> PrivacyLedger:
    settings: dict[str, object] = {"accountant": "rdp", "delta": None, "num_samples": 1000}
    settings.update(overrides)
    return PrivacyLedger.open(state_dir, **settings)  # type: ignore[arg-type]


def charge_rounds(ledger: PrivacyLedger, rounds: range, run_id: str = "run-1") -> None:
    for server_round in rounds:
        ledger.charge(server_round=server_round, run_id=run_id, **ROUND)  # type: ignore[arg-type]


def run_child(script: str, **kwargs: object) -> subprocess.Popen[str]:
    """Start ``python -c script`` with the repository importable; stdout is line-buffered text."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )  # type: ignore[call-overload]


def wait_for_line(child: subprocess.Popen[str], expected: str, timeout: float = 120.0) -> list[str]:
    """Read the child's stdout until a line equals ``expected``; return the lines read."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert child.stdout is not None
    while time.monotonic() < deadline:
        line = child.stdout.readline().strip()
        if not line and child.poll() is not None:
            pytest.fail(f"child exited early: {child.stderr.read() if child.stderr else ''}")
        lines.append(line)
        if line == expected:
            return lines
    pytest.fail(f"child never printed {expected!r}")


# ---------------------------------------------------------------------- format and composition


def test_a_new_site_writes_its_ledger_on_the_first_charge(tmp_path: Path) -> None:
    """No file until the first charge; then every required field, with ISO-8601 UTC time."""
    # Prepare
    ledger = open_ledger(tmp_path)
    assert not (tmp_path / LEDGER_FILENAME).exists()
    # Execute
    entry = ledger.charge(server_round=1, run_id=7, **ROUND)  # type: ignore[arg-type]
    # Assert
    document = json.loads((tmp_path / LEDGER_FILENAME).read_text())
    assert document["accountant"] == "rdp"
    assert document["delta"] == pytest.approx(1 / (10 * 1000))
    assert document["epsilon"] == pytest.approx(entry.epsilon_after)
    (stored,) = document["entries"]
    assert stored | {"time": None} == {
        "round": 1,
        "run_id": "7",
        "time": None,
        "noise_multiplier": 1.1,
        "sample_rate": 0.02,
        "steps": 100,
        "delta": document["delta"],
        "epsilon_after": entry.epsilon_after,
    }
    written = datetime.fromisoformat(stored["time"])
    assert written.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - written).total_seconds()) < 3600


def test_epsilon_composes_every_entry_across_reloads(tmp_path: Path) -> None:
    """A reloaded ledger's epsilon is the composition of all entries ever, not the last run's."""
    # Prepare
    charge_rounds(open_ledger(tmp_path), range(1, 4), run_id="run-1")
    charge_rounds(open_ledger(tmp_path), range(1, 3), run_id="run-2")  # a second run
    # Execute
    ledger = PrivacyLedger.read(tmp_path)
    # Assert
    mechanism = (ROUND["noise_multiplier"], ROUND["sample_rate"], ROUND["steps"])
    assert ledger.history == [mechanism] * 5
    assert ledger.epsilon == pytest.approx(
        epsilon_from_history([mechanism] * 5, delta=ledger.delta, accountant="rdp")
    )
    epsilons = [entry.epsilon_after for entry in ledger.entries]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 5
    assert ledger.epsilon > epsilon_from_history(
        [mechanism] * 2, delta=ledger.delta, accountant="rdp"
    )


def test_an_unset_delta_reuses_the_ledgers(tmp_path: Path) -> None:
    """The default delta is fixed at creation: a site whose data grew keeps its ledger's delta."""
    # Prepare
    charge_rounds(open_ledger(tmp_path, num_samples=1000), range(1, 2))
    # Execute
    ledger = open_ledger(tmp_path, num_samples=5000)
    # Assert
    assert ledger.delta == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"delta": 1e-5}, "privacy.delta"), ({"accountant": "prv"}, "privacy.accountant")],
    ids=["other-delta", "other-accountant"],
)
def test_changing_delta_or_accountant_mid_history_is_refused(
    tmp_path: Path, overrides: dict[str, object], key: str
) -> None:
    # Prepare
    charge_rounds(open_ledger(tmp_path), range(1, 2))
    # Execute / Assert
    with pytest.raises(ConfigError, match=key):
        open_ledger(tmp_path, **overrides)


def test_a_delta_not_below_one_over_n_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="privacy.delta"):
        open_ledger(tmp_path, delta=1e-3, num_samples=1000)


# ---------------------------------------------------------------------- never a silent reset


def test_reading_a_missing_ledger_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PrivacyLedgerError, match="no privacy ledger"):
        PrivacyLedger.read(tmp_path)


def _valid_document() -> dict[str, object]:
    entry = {
        "round": 1,
        "run_id": "1",
        "time": "2025-01-01T00:00:00Z",
        "noise_multiplier": 1.0,
        "sample_rate": 0.01,
        "steps": 10,
        "delta": 1e-5,
        "epsilon_after": 0.1,
    }
    return {
        "format": "fedinfer-privacy-ledger",
        "version": 1,
        "accountant": "rdp",
        "delta": 1e-5,
        "epsilon": 0.1,
        "entries": [entry],
    }


def _with(path: tuple[str, ...], value: object) -> str:
    document = _valid_document()
    target: dict[str, object] = document
    for key in path[:-1]:
        child = target[key]
        target = child[0] if isinstance(child, list) else child  # type: ignore[assignment,index]
    target[path[-1]] = value
    return json.dumps(document)


@pytest.mark.parametrize(
    "content",
    [
        '{"format": "fedinfer-privacy-ledger", "version": 1, "accou',
        "[]",
        _with(("format",), "something-else"),
        _with(("version",), 2),
        _with(("accountant",), "moments"),
        _with(("entries", "steps"), -3),
        _with(("entries", "steps"), "ten"),
        _with(("entries", "noise_multiplier"), 0.0),
        _with(("entries", "delta"), 1e-6),
        _with(("entries", "time"), "yesterday"),
        json.dumps({k: v for k, v in _valid_document().items() if k != "entries"}),
    ],
    ids=[
        "truncated",
        "not-an-object",
        "other-format",
        "future-version",
        "unknown-accountant",
        "negative-steps",
        "string-steps",
        "zero-noise",
        "entry-delta-differs",
        "bad-time",
        "no-entries",
    ],
)
def test_a_corrupt_ledger_is_an_error_and_is_left_alone(tmp_path: Path, content: str) -> None:
    """Corrupt or unknown-format ledgers raise; the file is never reset or rewritten."""
    # Prepare
    path = tmp_path / LEDGER_FILENAME
    path.write_text(content)
    # Execute / Assert
    with pytest.raises(PrivacyLedgerError, match="never delete it"):
        open_ledger(tmp_path, num_samples=100)
    assert path.read_text() == content


def test_the_valid_fixture_document_loads(tmp_path: Path) -> None:
    """Negative twin of the corruption table: the unmodified document is accepted."""
    (tmp_path / LEDGER_FILENAME).write_text(json.dumps(_valid_document()))
    assert PrivacyLedger.read(tmp_path).total_steps == 10


# ---------------------------------------------------------------------- budget


def test_a_round_past_the_budget_is_refused_with_the_numbers(tmp_path: Path) -> None:
    # Prepare
    ledger = open_ledger(tmp_path)
    charge_rounds(ledger, range(1, 3))
    before = (tmp_path / LEDGER_FILENAME).read_bytes()
    projected = ledger.projected_epsilon(**ROUND)  # type: ignore[arg-type]
    # Execute
    with pytest.raises(PrivacyBudgetExceeded, match="privacy.max_epsilon") as refused:
        ledger.check_budget(**ROUND, max_epsilon=projected - 0.01)  # type: ignore[arg-type]
    # Assert
    assert refused.value.spent == pytest.approx(ledger.epsilon)
    assert refused.value.projected == pytest.approx(projected)
    assert refused.value.budget == pytest.approx(projected - 0.01)
    assert ledger.epsilon < projected
    assert (tmp_path / LEDGER_FILENAME).read_bytes() == before


def test_a_round_within_the_budget_passes_and_charges_nothing(tmp_path: Path) -> None:
    # Prepare
    ledger = open_ledger(tmp_path)
    # Execute
    projected = ledger.check_budget(**ROUND, max_epsilon=100.0)  # type: ignore[arg-type]
    # Assert
    assert projected > 0 and ledger.entries == () and ledger.epsilon == 0.0


# ---------------------------------------------------------------------- crash safety


def test_a_failed_replace_leaves_the_old_ledger_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If os.replace fails (disk full, ...), the old ledger stays, no temp file, nothing charged."""
    # Prepare
    ledger = open_ledger(tmp_path)
    charge_rounds(ledger, range(1, 3))
    before = (tmp_path / LEDGER_FILENAME).read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    # Execute
    with pytest.raises(OSError, match="No space left"):
        ledger.charge(server_round=3, run_id="run-1", **ROUND)  # type: ignore[arg-type]
    # Assert
    assert (tmp_path / LEDGER_FILENAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER_FILENAME, "ledger.json.lock"]
    assert len(ledger.entries) == 2


CHILD_KILLED_BEFORE_REPLACE = """
    import os, sys, time
    from fedinfer.privacy import PrivacyLedger
    ledger = PrivacyLedger.open(sys.argv[1], accountant="rdp", delta=None, num_samples=1000)
    ledger.charge(server_round=1, run_id="run-1", noise_multiplier=1.1, sample_rate=0.02, steps=100)
    def stall(src, dst):  # the new ledger is written and fsynced: die before it replaces the old
        print("WRITTEN", flush=True)
        time.sleep(600)
    os.replace = stall
    print("CHARGED", flush=True)
    ledger.charge(server_round=2, run_id="run-1", noise_multiplier=1.1, sample_rate=0.02, steps=100)
"""


def test_a_writer_killed_between_write_and_replace_leaves_the_old_ledger(tmp_path: Path) -> None:
    """SIGKILL after the temp file is written but before os.replace: the old ledger survives."""
    # Prepare
    script = CHILD_KILLED_BEFORE_REPLACE.replace("sys.argv[1]", repr(str(tmp_path)))
    with run_child(script) as child:
        wait_for_line(child, "CHARGED")
        before = (tmp_path / LEDGER_FILENAME).read_bytes()
        wait_for_line(child, "WRITTEN")
        # Execute
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    # Assert
    assert (tmp_path / LEDGER_FILENAME).read_bytes() == before
    assert list(tmp_path.glob(".ledger.json.*.tmp")), "the killed writer's temp file is there"
    ledger = PrivacyLedger.read(tmp_path)
    assert [entry.round for entry in ledger.entries] == [1]
    ledger.charge(server_round=2, run_id="run-2", **ROUND)  # type: ignore[arg-type]
    assert not list(tmp_path.glob(".ledger.json.*.tmp")), "the next charge tidies it"
    assert [entry.round for entry in PrivacyLedger.read(tmp_path).entries] == [1, 2]


CHILD_CHARGING_FOREVER = """
    import sys
    from fedinfer.privacy import PrivacyLedger
    ledger = PrivacyLedger.open(sys.argv[1], accountant="rdp", delta=None, num_samples=1000)
    server_round = 0
    while True:
        server_round += 1
        ledger.charge(server_round=server_round, run_id="run-1", noise_multiplier=1.1,
                      sample_rate=0.02, steps=100)
        print(f"ROUND {server_round}", flush=True)
"""


def test_a_site_killed_mid_run_continues_from_its_spent_epsilon(tmp_path: Path) -> None:
    """A real process charges rounds until SIGKILL; a new process continues from its epsilon."""
    # Prepare
    with run_child(CHILD_CHARGING_FOREVER.replace("sys.argv[1]", repr(str(tmp_path)))) as child:
        wait_for_line(child, "ROUND 5")
        # Execute
        child.send_signal(signal.SIGKILL)  # most likely mid-way through a charge
        child.wait(timeout=30)
    restarted = open_ledger(tmp_path)
    spent = restarted.epsilon
    done = len(restarted.entries)
    entry = restarted.charge(server_round=done + 1, run_id="run-2", **ROUND)  # type: ignore[arg-type]
    # Assert
    assert done >= 5
    assert [e.round for e in restarted.entries] == list(range(1, done + 2))
    mechanism = (ROUND["noise_multiplier"], ROUND["sample_rate"], ROUND["steps"])
    assert spent == pytest.approx(
        epsilon_from_history([mechanism] * done, delta=restarted.delta, accountant="rdp")
    )
    assert entry.epsilon_after is not None and entry.epsilon_after > spent


CHILD_CHARGING_N = """
    import sys
    from fedinfer.privacy import PrivacyLedger
    ledger = PrivacyLedger.open(sys.argv[1], accountant="rdp", delta=None, num_samples=1000)
    print("READY", flush=True)
    sys.stdin.readline()
    for server_round in range(1, 11):
        ledger.charge(server_round=server_round, run_id=sys.argv[2], noise_multiplier=1.1,
                      sample_rate=0.02, steps=100)
"""


@pytest.mark.slow  # two fresh interpreters importing torch at once: ~20 s on a busy 2-core box
def test_concurrent_charges_from_two_processes_are_all_kept(tmp_path: Path) -> None:
    """Two processes charging the same site at once lose no entry (flock + re-read)."""
    # Prepare
    script = CHILD_CHARGING_N.replace("sys.argv[1]", repr(str(tmp_path)))
    children = [
        run_child(script.replace("sys.argv[2]", repr(name)), stdin=subprocess.PIPE)
        for name in ("a", "b")
    ]
    for child in children:
        wait_for_line(child, "READY")
    # Execute
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    for child in children:
        with child:
            assert child.wait(timeout=120) == 0, child.stderr.read() if child.stderr else ""
    # Assert
    ledger = PrivacyLedger.read(tmp_path)
    assert sorted(entry.run_id for entry in ledger.entries) == ["a"] * 10 + ["b"] * 10
