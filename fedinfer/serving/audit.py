"""Audit log of the inference server, and its offline summary.

One JSON object per line, per request: time, request id, principal, endpoint,
model, version, rows, batch size, latency, status. Never inputs or outputs.
The file is opened ``O_APPEND`` (each line is one ``write``), and rotated by
size: ``audit.jsonl`` is renamed to ``audit-<UTC time>.jsonl`` and a new one
started; only the oldest rotated files beyond ``max_files`` are deleted.

Encrypted at rest (``key=``, a :class:`~fedinfer.crypto.StateKey`), every line
is base64 of a ciphertext and each file starts with a sealed header::

    line 0   sealed with the site key (name "audit-header"):
             {"format": "fedinfer-audit", "version": 1, "file_id": <16 random bytes, hex>,
              "created": ..., "prev": {"file_id": ..., "lines": N} | null}
    line i   ChaCha20-Poly1305 under HKDF(site key, salt=file_id), nonce = i,
             associated data = file_id || i: the record of line i

A deleted, reordered, truncated or edited line fails authentication at its
position; ``prev`` chains each file to the one before it, so a deleted or
shortened rotated file is detected too. What stays undetectable: dropping the
newest lines of the active file, or the whole active file. A writer starts a
fresh file (new ``file_id``, so a fresh sub-key and nonces) every time it opens
the directory, and holds a lock: one server per audit directory.

Under ``fedinfer serve --workers N`` the parent process is that one writer: each
worker sends its records down its own pipe (:class:`AuditPipe`, one ``write`` per
event-loop iteration) and the parent appends whole lines only, so the records of
concurrent workers never interleave within a line, and the format, chain and
rotation are those of a single server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import json
import os
import statistics
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedinfer.crypto.at_rest import KEY_ENV_VAR, StateKey, is_sealed, sealed_key_id
from fedinfer.errors import DataError, ServingError, StateKeyError
from fedinfer.fsutil import atomic_write_bytes

__all__ = [
    "AuditLog",
    "AuditPipe",
    "PrincipalUsage",
    "locked_audit_dir",
    "reseal_audit",
    "summarize_audit",
]

ACTIVE_NAME = "audit.jsonl"
_HEADER_NAME = "audit-header"
_HEADER_FORMAT = "fedinfer-audit"
_LINE_CONTEXT = b"fedinfer-audit-line/v1"


class _SealedFile:
    """The cipher state of one encrypted audit file: its id, sub-key and line count."""

    def __init__(self, key: StateKey, file_id: bytes, lines: int = 0) -> None:
        self.file_id = file_id
        self.lines = lines  # lines written so far, header included: the next line's number
        self._aead = ChaCha20Poly1305(key.derive(salt=file_id, info=b"fedinfer audit log v1"))

    def _nonce_aad(self, number: int) -> tuple[bytes, bytes]:
        return number.to_bytes(12, "big"), _LINE_CONTEXT + self.file_id + number.to_bytes(8, "big")

    def seal_lines(self, records: list[bytes]) -> bytes:
        """Encrypted lines for ``records``, numbered from :attr:`lines` (not advanced)."""
        out = []
        for number, record in enumerate(records, start=self.lines):
            nonce, aad = self._nonce_aad(number)
            out.append(base64.b64encode(self._aead.encrypt(nonce, record, aad)) + b"\n")
        return b"".join(out)

    def open_line(self, line: bytes, number: int) -> bytes:
        """Plaintext of line ``number``; raises ``InvalidTag`` / ``binascii.Error`` if bad."""
        nonce, aad = self._nonce_aad(number)
        return self._aead.decrypt(nonce, base64.b64decode(line, validate=True), aad)


def _header_line(key: StateKey, file_id: bytes, prev: dict[str, Any] | None) -> bytes:
    header = {
        "format": _HEADER_FORMAT,
        "version": 1,
        "file_id": file_id.hex(),
        "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "prev": prev,
    }
    sealed = key.seal(json.dumps(header).encode(), name=_HEADER_NAME)
    return base64.b64encode(sealed) + b"\n"


def _open_header(key: StateKey, line: bytes, path: Path) -> dict[str, Any]:
    try:
        blob = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{path} line 1 is not an encrypted audit header (tampered?)") from None
    header = json.loads(
        key.open(blob, name=_HEADER_NAME, source=f"{path} line 1", tampered=DataError)
    )
    if not isinstance(header, dict) or header.get("format") != _HEADER_FORMAT:
        raise DataError(f"{path} line 1 is not a fedinfer audit header")
    return header


def _check_mode(path: Path, first_line: bytes, key: StateKey | None) -> None:
    """Refuse a plaintext audit file where an encrypted one is expected, and the reverse."""
    sealed = not first_line.startswith(b"{")
    if sealed and key is None:
        found = _b64_key_id(first_line)
        key_id = f" (state key id {found})" if found else ""
        raise StateKeyError(
            f"{path} is encrypted at rest{key_id}; pass --state-key FILE (or set {KEY_ENV_VAR})"
        )
    if not sealed and key is not None:
        raise StateKeyError(
            f"{path} holds plaintext audit records, but the state is encrypted with "
            f"{key.label}; encrypt it with `fedinfer keys encrypt-state DIR --state-key FILE`"
        )


def _lock_dir(directory: Path) -> int:
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServingError(
            f"another process (a running server?) writes the encrypted audit log in "
            f"{directory}; stop it, or give each server its own --audit-dir"
        ) from None
    return fd


@contextmanager
def locked_audit_dir(directory: Path) -> Iterator[None]:
    """Hold the lock a server with an encrypted audit log holds (raise if one does)."""
    fd = _lock_dir(Path(directory))
    try:
        yield
    finally:
        os.close(fd)


def _complete_lines(path: Path) -> list[bytes]:
    """The newline-terminated lines of ``path``; a torn last line (a crash) is left out."""
    data = path.read_bytes()
    return data.split(b"\n")[:-1]


class _LineBatcher:
    """Records become JSON lines, written in one batch per event-loop iteration."""

    def __init__(self) -> None:
        self._pending: list[bytes] = []

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
        if lines and self._is_open():
            self._append(lines)

    def _is_open(self) -> bool:
        raise NotImplementedError

    def _append(self, lines: list[bytes]) -> None:
        raise NotImplementedError


class AuditPipe(_LineBatcher):
    """The audit log of one ``fedinfer serve --workers N`` worker: lines go to the parent.

    Parameters
    ----------
    fd : int
        Write end of a pipe that only this worker writes; the parent reads it and
        appends whole lines to the site's :class:`AuditLog` (a line cut short by the
        worker's death is dropped there, never written).
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def _is_open(self) -> bool:
        return self._fd >= 0

    def _append(self, lines: list[bytes]) -> None:
        view = memoryview(b"".join(lines))
        while view:  # a blocking pipe: a full one (the parent behind) holds this worker back
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        """Send what is buffered and close the pipe."""
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class AuditLog(_LineBatcher):
    """Append-only, size-rotated JSON-lines audit log in ``directory``.

    Parameters
    ----------
    directory : Path
        Created if missing (mode 0700).
    max_bytes : int
        Rotate when the active file would exceed this (default: 10 MiB).
    max_files : int
        Rotated files kept (default: 50).
    key : StateKey or None
        Encrypt every line with the site key (default: None, plaintext JSON lines).

    Raises
    ------
    StateKeyError
        The directory's active file is plaintext and ``key`` is given, or the reverse.
    ServingError
        ``key`` is given and another process writes this encrypted audit directory.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 10 << 20,
        max_files: int = 50,
        key: StateKey | None = None,
    ) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.key = key
        self._sealed: _SealedFile | None = None
        self._lock_fd = self._lock() if key is not None else -1
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        if self._size:
            self._continue_existing()
        if key is not None and self._sealed is None:
            self._start_sealed(prev=None)

    def _open(self) -> int:
        return os.open(self.directory / ACTIVE_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _lock(self) -> int:
        return _lock_dir(self.directory)

    def _continue_existing(self) -> None:
        """Append to a plaintext file; rotate a sealed one away and chain a fresh file to it."""
        path = self.directory / ACTIVE_NAME
        lines = _complete_lines(path)
        _check_mode(path, lines[0] if lines else path.read_bytes(), self.key)
        if self.key is None:
            return
        prev = None
        if lines:  # else only a torn header: nothing to chain to
            header = _open_header(self.key, lines[0], path)
            prev = {"file_id": header["file_id"], "lines": len(lines)}
        self._start_sealed(prev=prev, rotate=True)

    def _start_sealed(self, *, prev: dict[str, Any] | None, rotate: bool = False) -> None:
        assert self.key is not None
        if rotate:
            self._rotate_file()
        sealed = _SealedFile(self.key, os.urandom(16))
        header = _header_line(self.key, sealed.file_id, prev)
        os.write(self._fd, header)
        self._size += len(header)
        sealed.lines = 1
        self._sealed = sealed

    def append_lines(self, lines: list[bytes]) -> None:
        """Append whole JSON lines (each ending in a newline) at once: a worker's batch."""
        if lines and self._is_open():
            self._append(lines)

    def _is_open(self) -> bool:
        return self._fd >= 0

    def _append(self, lines: list[bytes]) -> None:
        data = self._encode(lines)
        if self._size + len(data) > self.max_bytes and self._has_records():
            self._rotate()
            data = self._encode(lines)
        os.write(self._fd, data)
        self._size += len(data)
        if self._sealed is not None:
            self._sealed.lines += len(lines)

    def _encode(self, lines: list[bytes]) -> bytes:
        if self._sealed is None:
            return b"".join(lines)
        return self._sealed.seal_lines([line.rstrip(b"\n") for line in lines])

    def _has_records(self) -> bool:
        return self._size > 0 if self._sealed is None else self._sealed.lines > 1

    def _rotate(self) -> None:
        if self._sealed is None:
            self._rotate_file()
            return
        prev = {"file_id": self._sealed.file_id.hex(), "lines": self._sealed.lines}
        self._start_sealed(prev=prev, rotate=True)

    def _rotate_file(self) -> None:
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
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def reseal_audit(directory: Path, *, old: StateKey | None, new: StateKey) -> int:
    """Re-encrypt every audit file of ``directory`` from ``old`` (None: plaintext) to ``new``.

    Files are rewritten atomically, oldest first, keeping the chain (a sealed file keeps
    its id; plaintext files get ids and are chained in order); a file already sealed
    with ``new`` is only authenticated, so an interrupted run is finished by running it
    again. Stop the server first: it holds the directory's lock. Returns files rewritten.
    """
    directory = Path(directory)
    files = sorted(directory.glob("audit-*.jsonl")) + [directory / ACTIVE_NAME]
    chain: dict[str, Any] | None = None
    rewritten = 0
    for path in (p for p in files if p.is_file()):
        lines = _complete_lines(path)
        if not lines:
            continue
        if not lines[0].startswith(b"{") and _b64_key_id(lines[0]) == new.key_id:
            _, chain = _open_sealed_file(new, path, lines, chain)  # done by an earlier run
            continue
        chain = _reseal_one(path, lines, old=old, new=new, prev=chain)
        rewritten += 1
    return rewritten


def _reseal_one(
    path: Path,
    lines: list[bytes],
    *,
    old: StateKey | None,
    new: StateKey,
    prev: dict[str, Any] | None,
) -> dict[str, Any]:
    _check_mode(path, lines[0], old)
    if old is None:
        records = [ln for ln in lines if _is_json_object(ln)]
        file_id = os.urandom(16)
    else:
        header = _open_header(old, lines[0], path)
        plain, _ = _open_sealed_file(old, path, lines, None)
        records, file_id, prev = list(plain), bytes.fromhex(header["file_id"]), header["prev"]
    sealed = _SealedFile(new, file_id, lines=1)
    data = _header_line(new, file_id, prev) + sealed.seal_lines(records)
    atomic_write_bytes(path, data, mode=0o600)
    return {"file_id": file_id.hex(), "lines": 1 + len(records)}


def _b64_key_id(line: bytes) -> str | None:
    try:
        blob = base64.b64decode(line[:64], validate=True)
    except (binascii.Error, ValueError):
        return None
    return sealed_key_id(blob) if is_sealed(blob) else None


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


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
    key: StateKey | None = None,
    window_s: float = 60.0,
    spike_factor: float = 10.0,
    min_requests: int = 20,
    min_windows: int = 3,
) -> list[PrincipalUsage]:
    """Usage per principal, flagging request-rate spikes far above the principal's baseline.

    A principal is flagged when its busiest ``window_s`` window holds at least
    ``min_requests`` requests and more than ``spike_factor`` times its baseline
    (the median of its other active windows; needs ``min_windows`` of them).
    An encrypted log needs its site ``key``; any line or file that fails
    authentication (deleted, reordered, truncated, edited) raises a
    :class:`~fedinfer.errors.DataError` naming it.

    Examples
    --------
    >>> for usage in summarize_audit(Path("site/audit")):  # doctest: +SKIP
    ...     print(usage.principal, usage.requests, usage.flagged)
    """
    usage: dict[str, PrincipalUsage] = {}
    for record in _records(Path(directory), key):
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


def _records(directory: Path, key: StateKey | None) -> list[dict[str, Any]]:
    if not directory.is_dir():
        raise DataError(f"audit directory {directory} does not exist")
    files = sorted(directory.glob("audit-*.jsonl")) + [directory / ACTIVE_NAME]
    records = []
    chain: dict[str, Any] | None = None  # (file id, lines) of the previous sealed file
    for path in files:
        if not path.is_file():
            continue
        lines = _complete_lines(path)  # a torn last line (a crash mid-write) is skipped
        if not lines:
            continue
        _check_mode(path, lines[0], key)
        if key is None:
            raw: Iterator[bytes] = iter(lines)
        else:
            raw, chain = _open_sealed_file(key, path, lines, chain)
        for line in raw:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # plaintext: a line torn by a crash and then appended to
            if isinstance(record, dict):
                records.append(record)
    return records


def _open_sealed_file(
    key: StateKey, path: Path, lines: list[bytes], chain: dict[str, Any] | None
) -> tuple[Iterator[bytes], dict[str, Any]]:
    """Decrypt one file's lines, checking its place in the chain of files."""
    header = _open_header(key, lines[0], path)
    if chain is not None and header.get("prev") != chain:
        raise DataError(
            f"{path} does not follow the audit file before it (expected {chain}, its header "
            f"says {header.get('prev')}): a rotated file was deleted, shortened or replaced"
        )
    sealed = _SealedFile(key, bytes.fromhex(str(header["file_id"])))

    def plaintexts() -> Iterator[bytes]:
        for number, line in enumerate(lines[1:], start=1):
            try:
                yield sealed.open_line(line, number)
            except (InvalidTag, binascii.Error, ValueError):
                raise DataError(
                    f"{path} line {number + 1} fails authentication: a line was deleted, "
                    "reordered, truncated or edited; the audit log is not trustworthy from here"
                ) from None

    return plaintexts(), {"file_id": header["file_id"], "lines": len(lines)}


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
