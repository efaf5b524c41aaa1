"""``python -m fedinfer.deploy.supernode``: Flower's own SuperNode, polling sooner.

Flower 1.42's SuperNode asks the SuperLink for a message, and when there is none sleeps 3 s
(``time.sleep(3)`` in ``flwr/supernode/start_client_internal.py``) before asking again: a
message from the coordinator waits 1.5 s on average before a site even sees it, in every
exchange of every round. Then it checks its own in-memory state for the reply every 0.5 s
(``time.sleep(0.5)``, twice in ``_push_messages``). This launcher runs Flower's unchanged
``flower-supernode`` main with the first sleep shortened to ``--idle-poll-s`` and the local
reply check to :data:`REPLY_POLL_S` (every option untouched); ``tests/test_deploy_supernode.py``
fails if a patch point moves.

    python -m fedinfer.deploy.supernode --idle-poll-s 0.5 -- <flower-supernode options>
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from fedinfer.deploy.keyfiles import write_private

__all__ = [
    "DEFAULT_IDLE_POLL_S",
    "FLOWER_IDLE_SLEEP_S",
    "FLOWER_REPLY_SLEEP_S",
    "REPLY_POLL_S",
    "SECRET_BYTES",
    "main",
    "patch_idle_sleep",
    "write_runtime_secret",
]

FLOWER_IDLE_SLEEP_S = 3
"""What Flower 1.42's SuperNode sleeps after an empty poll of the SuperLink."""
DEFAULT_IDLE_POLL_S = 0.5
"""Our default (see BENCHMARKS.md, "Deployment"): one TLS request every 0.5 s per idle site."""
FLOWER_REPLY_SLEEP_S = 0.5
"""What Flower 1.42's SuperNode sleeps between looks at its own state for a reply to send."""
REPLY_POLL_S = 0.05
"""Ours: a look at an in-memory table, no network; 0.25 s less per exchange on average."""
SECRET_BYTES = 32


def write_runtime_secret(path: Path) -> Path:
    """Write a fresh SuperExec secret for ``--superexec-auth-secret-file``: 32 bytes, 0600.

    The site worker signs its task claims with it (:mod:`fedinfer.deploy.flower_runtime`);
    Flower reads the file as raw bytes. From the OS CSPRNG, new at every site start.
    """
    return write_private(Path(path), os.urandom(SECRET_BYTES), overwrite=True)


class _IdleTime:
    """The ``time`` module as ``start_client_internal`` sees it: one sleep shortened."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s

    def sleep(self, seconds: float) -> None:  # noqa: D102
        if seconds == FLOWER_IDLE_SLEEP_S:
            seconds = self.idle_s
        elif seconds == FLOWER_REPLY_SLEEP_S:
            seconds = REPLY_POLL_S
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def patch_idle_sleep(idle_s: float) -> ModuleType:
    """Make Flower's SuperNode loop sleep ``idle_s`` instead of 3 s when idle (and check for a
    reply every :data:`REPLY_POLL_S` instead of 0.5 s); returns the patched module.

    Raises
    ------
    RuntimeError
        Flower's module no longer looks as it did in 1.42 (the patch would do nothing).
    """
    import flwr.supernode.start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer uses the `time` module: "
            "run flower-supernode itself (fedinfer site --supernode-idle-poll-s 3)"
        )
    loop.time = _IdleTime(idle_s)  # type: ignore[assignment]
    return loop


def main(argv: list[str] | None = None) -> int:
    """Parse ``--idle-poll-s``, patch, and hand every other argument to ``flower-supernode``."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--idle-poll-s", type=float, default=DEFAULT_IDLE_POLL_S)
    parser.add_argument("flower_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if not 0 < args.idle_poll_s <= FLOWER_IDLE_SLEEP_S:
        parser.error(
            f"--idle-poll-s must be in (0, {FLOWER_IDLE_SLEEP_S}] (got {args.idle_poll_s})"
        )
    patch_idle_sleep(args.idle_poll_s)
    from flwr.supernode.cli import flower_supernode

    rest = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
