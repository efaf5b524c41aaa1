"""Audit log of the inference server, and its offline summary.

One JSON object per line, per request: time, request id, principal, endpoint,
model, version, rows, batch size, latency, status. Never inputs or outputs.
The file is opened ``O_APPEND`` (each line is one ``write``), and rotated by
size: ``audit.jsonl`` is renamed to ``audit-<UTC time>.jsonl`` and a new one
started; only the oldest rotated files beyond ``max_files`` are deleted.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedinfer.errors import DataError

__all__ = ["AuditLog", "PrincipalUsage", "summarize_audit"]

ACTIVE_NAME = "audit.jsonl"


class AuditLog:
    """Append-only, size-rotated JSON-lines audit log in ``directory``.

    Parameters
    ----------
    directory : Path
        Created if missing (mode 0700).
    max_bytes : int
        Rotate when the active file would exceed this (default: 10 MiB).
    max_files : int
        Rotated files kept (default: 50).
    """

    def __init__(self, directory: Path, *, max_bytes: int = 10 << 20, max_files: int = 50) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._pending: list[bytes] = []

    def _open(self) -> int:
        return os.open(self.directory / ACTIVE_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a dict of JSON scalars) as a line.

        On an event loop, the lines of one loop iteration go out in a single ``write``
        at the end of that iteration (one syscall per batch under load, not per
        request); without a running loop the line is written at once.
        """
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("utf-8")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._append([line])
            return
        if not self._pending:
            loop.call_soon(self.flush)
        self._pending.append(line)

    def flush(self) -> None:
        """Write the lines buffered in this event-loop iteration."""
        lines, self._pending = self._pending, []
        if lines and self._fd >= 0:
            self._append(lines)

    def _append(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self._rotate()
        os.write(self._fd, data)
        self._size += len(data)

    def _rotate(self) -> None:
        os.close(self._fd)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        os.rename(self.directory / ACTIVE_NAME, self.directory / f"audit-{stamp}.jsonl")
        rotated = sorted(self.directory.glob("audit-*.jsonl"))
        for old in rotated[: max(0, len(rotated) - self.max_files)]:
            old.unlink(missing_ok=True)
        self._fd = self._open()
        self._size = 0

    def close(self) -> None:
        """Flush to disk and close."""
        self.flush()
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


@dataclass
class PrincipalUsage:
    """Usage of one principal over the audit files read."""

    principal: str
    requests: int = 0
    rows: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    windows: Counter[int] = field(default_factory=Counter)
    """Requests per time window (window index -> count)."""
    baseline: float | None = None
    """Median requests per active window, the peak window excluded."""
    peak: int = 0
    peak_start: str | None = None
    flagged: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the raw latency list)."""
        lat = sorted(self.latencies_ms)
        return {
            "principal": self.principal,
            "requests": self.requests,
            "rows": self.rows,
            "errors": sum(n for s, n in self.statuses.items() if s >= 400),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_ms": lat[len(lat) // 2] if lat else None,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "baseline_per_window": self.baseline,
            "peak_per_window": self.peak,
            "peak_start": self.peak_start,
            "flagged": self.flagged,
        }


def summarize_audit(
    directory: Path,
    *,
    window_s: float = 60.0,
    spike_factor: float = 10.0,
    min_requests: int = 20,
    min_windows: int = 3,
) -> list[PrincipalUsage]:
    """Usage per principal, flagging request-rate spikes far above the principal's baseline.

    A principal is flagged when its busiest ``window_s`` window holds at least
    ``min_requests`` requests and more than ``spike_factor`` times its baseline
    (the median of its other active windows; needs ``min_windows`` of them).

    Examples
    --------
    >>> for usage in summarize_audit(Path("site/audit")):  # doctest: +SKIP
    ...     print(usage.principal, usage.requests, usage.flagged)
    """
    usage: dict[str, PrincipalUsage] = {}
    for record in _records(Path(directory)):
        name = str(record.get("principal") or "-")
        u = usage.setdefault(name, PrincipalUsage(name))
        u.requests += 1
        u.rows += int(record.get("rows") or 0)
        u.statuses[int(record.get("status", 0))] += 1
        if isinstance(record.get("latency_ms"), (int, float)):
            u.latencies_ms.append(float(record["latency_ms"]))
        ts = _timestamp(record.get("ts"))
        if ts is not None:
            u.windows[int(ts // window_s)] += 1
    for u in usage.values():
        _flag(u, window_s, spike_factor, min_requests, min_windows)
    return sorted(usage.values(), key=lambda u: (-u.requests, u.principal))


def _records(directory: Path) -> list[dict[str, Any]]:
    if not directory.is_dir():
        raise DataError(f"audit directory {directory} does not exist")
    files = sorted(directory.glob("audit-*.jsonl")) + [directory / ACTIVE_NAME]
    records = []
    for path in files:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
            if isinstance(record, dict):
                records.append(record)
    return records


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _flag(
    u: PrincipalUsage, window_s: float, factor: float, min_requests: int, min_windows: int
) -> None:
    if not u.windows:
        return
    peak_window, u.peak = max(u.windows.items(), key=lambda kv: kv[1])
    u.peak_start = datetime.fromtimestamp(peak_window * window_s, UTC).isoformat()
    others = [n for w, n in u.windows.items() if w != peak_window]
    if len(others) < min_windows:
        return
    u.baseline = float(statistics.median(others))
    u.flagged = u.peak >= min_requests and u.peak > factor * u.baseline
