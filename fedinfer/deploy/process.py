"""Child processes of the launchers: one log file each, own process group, no orphans.

Each child runs in its own process group, so stopping it reaches whatever it
started in that group; on Linux it also gets ``SIGTERM`` when the launcher dies
(``PR_SET_PDEATHSIG``), even from ``SIGKILL``. Flower's SuperExec and app
processes start their own sessions but watch their parent's pid and exit with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType

from fedinfer.errors import FedInferError

__all__ = ["ManagedProcess", "Shutdown", "free_port", "signals_raise_shutdown", "wait_until"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class Shutdown(Exception):  # noqa: N818 - a request, not an error
    """SIGTERM or SIGINT arrived: the launcher stops its children and exits."""


def _raise_shutdown(signum: int, frame: FrameType | None) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not interrupt the clean-up
        signal.signal(sig, signal.SIG_IGN)
    raise Shutdown(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_raise_shutdown() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Shutdown` (so ``finally`` cleans up)."""
    previous = {s: signal.signal(s, _raise_shutdown) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.2,
    alive: Callable[[], None] | None = None,
) -> None:
    """Poll ``condition`` until it holds; ``alive`` may raise if a process it waits on died.

    Raises
    ------
    FedInferError
        ``condition`` did not hold within ``timeout_s`` (the message says ``what``).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if alive is not None:
            alive()
        if condition():
            return
        if time.monotonic() > deadline:
            raise FedInferError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


class ManagedProcess:
    """A named child process writing stdout and stderr to ``log_file``.

    Parameters
    ----------
    name : str
        Shown in messages (``superlink``, ``supernode``, ``serve`` ...).
    argv : sequence of str
        The command.
    log_file : Path
        Appended to, so a restart keeps the earlier log.
    env : mapping or None
        The child's environment (default: the launcher's).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_file: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name, self.argv, self.log_file = name, list(argv), Path(log_file)
        self.env = dict(env) if env is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid (None before start)."""
        return self.process.pid if self.process else None

    def start(self) -> ManagedProcess:
        """Spawn the child; returns ``self``."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            log.write(f"\n=== {stamp} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(  # noqa: S603 - argv built by us, never a shell
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        logger.info("started %s (pid %s), log %s", self.name, self.process.pid, self.log_file)
        return self

    def poll(self) -> int | None:
        """Return the exit code, or None while it runs."""
        return None if self.process is None else self.process.poll()

    def check_alive(self) -> None:
        """Raise if the child has exited, pointing at its log."""
        code = self.poll()
        if code is not None:
            raise FedInferError(
                f"{self.name} exited with code {code}: {self.tail()}  (log: {self.log_file})"
            )

    def tail(self, lines: int = 3) -> str:
        """Return the last lines of the log, joined on one line (for error messages)."""
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM the child's process group, SIGKILL after ``timeout_s``; return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0fs; killing it", self.name, timeout_s)
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # leftovers of its group, if any
        return self.process.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
