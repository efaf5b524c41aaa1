"""Audit log rotation and the per-principal usage summary with spike flagging."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fedinfer.cli import main as cli_main
from fedinfer.serving.audit import AuditLog, summarize_audit

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _record(principal: str, when: datetime, status: int = 200) -> dict[str, object]:
    return {
        "ts": when.isoformat(),
        "request_id": "r",
        "principal": principal,
        "endpoint": "infer",
        "model": "m",
        "version": 1,
        "rows": 2,
        "batch_size": 4,
        "latency_ms": 1.5,
        "status": status,
    }


def test_rotation_keeps_every_line_and_bounds_file_size(tmp_path: Path) -> None:
    # Prepare
    log = AuditLog(tmp_path, max_bytes=1000, max_files=100)
    # Execute
    for i in range(50):
        log.write(_record("a", T0 + timedelta(seconds=i)))
    log.close()
    # Assert
    files = list(tmp_path.glob("audit*.jsonl"))
    assert len(files) > 3 and all(f.stat().st_size <= 1000 for f in files)
    assert sum(len(f.read_text().splitlines()) for f in files) == 50
    assert summarize_audit(tmp_path)[0].requests == 50


def test_summary_flags_a_principal_whose_rate_jumps_above_its_baseline(tmp_path: Path) -> None:
    # Prepare: 'steady' 10/min for 10 min; 'scraper' 5/min for 9 min, then 300 in one minute
    log = AuditLog(tmp_path)
    for minute in range(10):
        for i in range(10):
            log.write(_record("steady", T0 + timedelta(minutes=minute, seconds=i * 5)))
    for minute in range(9):
        for i in range(5):
            log.write(_record("scraper", T0 + timedelta(minutes=minute, seconds=i * 10)))
    for i in range(300):
        log.write(_record("scraper", T0 + timedelta(minutes=9, seconds=i * 0.19), status=200))
    log.write(_record("steady", T0, status=401))
    log.close()
    # Execute
    usage = {u.principal: u for u in summarize_audit(tmp_path)}
    # Assert
    assert usage["scraper"].flagged and usage["scraper"].peak == 300
    assert usage["scraper"].baseline == 5.0
    assert not usage["steady"].flagged
    assert usage["steady"].to_dict()["errors"] == 1


def test_cli_audit_summary(tmp_path: Path, capsys) -> None:
    log = AuditLog(tmp_path)
    log.write(_record("lab", T0))
    log.close()
    assert cli_main(["audit", "summary", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["principal"] == "lab" and out[0]["requests"] == 1
    assert cli_main(["audit", "summary", str(tmp_path / "missing")]) == 2
