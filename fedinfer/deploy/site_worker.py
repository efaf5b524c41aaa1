"""The site worker: the long-lived process of ``fedinfer site`` that runs the site's ClientApp.

The site's SuperNode runs in Flower's ``process`` isolation: it starts no ClientApp process of
its own; every message from the coordinator waits on its Runtime API (loopback) as a task. This
process, started once per site, claims those tasks (:mod:`fedinfer.deploy.flower_runtime`) and
runs the site's *own* ClientApp on them (:func:`fedinfer.deploy.apps.build_deploy_client_app`,
with torch, Opacus, fedinfer and the site's data loaded once): the site's policy checks, its
privacy ledger and the secure aggregation replay guard run unchanged, and all their state stays
in the state directory.

What the coordinator cannot do:

- run code at the site. The app bundle it ships is never installed or imported; only its
  run config is used, as a request checked against the site's policy. A bundle that does not
  even declare fedinfer's ClientApp (publisher and ``clientapp`` component of
  :mod:`fedinfer.deploy.bundle`) gets an ``Error`` reply saying so (and a line in worker.log).
- choose the node config: the handlers see the site's own ``node-config.toml``.

Who may claim a task: only a holder of ``<state-dir>/runtime.secret`` (0600 in the 0700 state
directory, fresh from the OS CSPRNG at every site start), with which claims are signed.

Every claimed task ends with a reply and a final status, as in ``flwr-clientapp``: a handler
that raises gives an ``Error`` reply and status FAILED, so the coordinator never waits for a
reply that will not come, and the worker carries on. Messages are handled one at a time, in
arrival order; the ledger and the replay guard were written for that.

    python -m fedinfer.deploy.site_worker --node-config DIR/node-config.toml \
        --runtime-api 127.0.0.1:PORT --secret-file DIR/runtime.secret
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import tomllib
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedinfer.deploy import flower_runtime as fr

__all__ = [
    "FOREIGN_APP",
    "Outcome",
    "SiteWorker",
    "foreign_app_reason",
    "load_node_config",
    "main",
    "serve_tasks",
]

logger = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]
FOREIGN_APP = "this site runs only its own fedinfer ClientApp"
_UNREACHABLE_LOG_EVERY_S = 30.0


def load_node_config(path: Path) -> dict[str, Any]:
    """The site's node config, as its SuperNode parses ``--node-config`` (flat string values)."""
    with open(path, "rb") as handle:
        return dict(tomllib.load(handle))


def foreign_app_reason(publisher: str, clientapp: str) -> str | None:
    """Why a bundle declaring ``publisher`` / ``clientapp`` is refused (None: it is fedinfer's).

    Declaring fedinfer's names earns nothing but the site's own ClientApp: the bundle's code
    is never run either way. The check only makes a foreign federation fail loudly.
    """
    from fedinfer.deploy.bundle import COMPONENTS, PUBLISHER

    if publisher == PUBLISHER and clientapp == COMPONENTS["clientapp"]:
        return None
    return (
        f"{FOREIGN_APP}; the coordinator's app bundle declares publisher {publisher!r} and "
        f"clientapp {clientapp!r}, not {PUBLISHER!r} and {COMPONENTS['clientapp']!r} "
        "(start the federation with `fedinfer coordinator`); its code was not run"
    )


@dataclass
class Outcome:
    """One message's reply and the task's final status, as ``flwr-clientapp`` reports them."""

    reply: Message
    context: Context
    failure: str | None = None

    @property
    def sub_status(self) -> str:  # noqa: D102
        return fr.SubStatus.FAILED if self.failure else fr.SubStatus.COMPLETED


class SiteWorker:
    """Runs messages through ``app`` with the site's own node config, one at a time.

    Parameters
    ----------
    app : ClientApp or callable
        The handlers (default in :func:`main`: the deployment ClientApp, with the site's
        data cached across messages).
    node_config : dict
        The site's node config; it replaces whatever node config a task carries.
    """

    def __init__(self, app: Handler, *, node_config: dict[str, Any]) -> None:
        self.app = app
        self.node_config = node_config
        self._lock = threading.Lock()

    def handle(self, message: Message, context: Context) -> Outcome:
        """Run one message; a crash becomes an ``Error`` reply and a failure, as in Flower."""
        context.node_config = dict(self.node_config)
        with self._lock:
            try:
                return Outcome(self.app(message, context), context)
            except Exception as exc:  # the worker must not die with one message
                logger.error("the ClientApp raised:\n%s", traceback.format_exc())
                reason = f"{type(exc)}:<'{exc}'>"
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
                return Outcome(Message(error, reply_to=message), context, reason)

    def refuse(self, message: Message, context: Context, reason: str) -> Outcome:
        """An ``Error`` reply that says why, without running anything."""
        from fedinfer.fl.messages import ErrorCodes

        logger.error("refused %s: %s", message.metadata.message_type, reason)
        error = Error(code=ErrorCodes.POLICY_REFUSED, reason=reason)
        return Outcome(Message(error, reply_to=message), context, reason)


def run_task(worker: SiteWorker, address: str, token: str) -> None:
    """Pull one task's message, run it, push the reply and the final status (never raises)."""
    with fr.task_client(address, token) as client, fr.TaskHeartbeat(client):
        outcome: Outcome | None = None
        context: Context | None = None
        failure = "the site worker failed before the ClientApp ran (see its worker.log)"
        claimed = time.perf_counter()
        try:
            message, context, _run, fab = fr.pull_task_input(client)
            pulled = time.perf_counter()
            logger.info(
                "%s message %s", message.metadata.message_type, message.metadata.message_id
            )
            reason = foreign_app_reason(*fr.app_identity(fab))
            if reason is not None:
                outcome = worker.refuse(message, context, reason)
            else:
                outcome = worker.handle(message, context)
            context, failure = outcome.context, outcome.failure or ""
            handled = time.perf_counter()
            fr.push_message(client, outcome.reply, outcome.context)
            logger.info(
                "%s replied: pull %.2f s, handler %.2f s, push %.2f s",
                message.metadata.message_type,
                pulled - claimed,
                handled - pulled,
                time.perf_counter() - handled,
            )
        except Exception:  # a broken task must not end the worker
            logger.error("task failed:\n%s", traceback.format_exc())
            failure = failure or "the site worker could not push its reply (see worker.log)"
        status = fr.SubStatus.FAILED if failure else fr.SubStatus.COMPLETED
        fr.push_task_output(client=client, context=context, sub_status=status, details=failure)


def serve_tasks(
    worker: SiteWorker, *, address: str, secret: bytes, stop: threading.Event
) -> None:
    """Claim and run ClientApp tasks from the SuperNode at ``address`` until ``stop`` is set.

    The SuperNode may not be up yet, or be restarting: the loop waits for it, and says so
    in the log now and then.
    """
    last_complaint = 0.0
    with fr.runtime_client(address, secret=secret) as client:
        while not stop.is_set():
            try:
                claimed = fr.acquire_task(client)
            except httpx.HTTPError as exc:  # not up yet, restarting, or refusing our secret
                if time.monotonic() - last_complaint > _UNREACHABLE_LOG_EVERY_S:
                    logger.warning("waiting for the SuperNode at %s (%s)", address, exc)
                    last_complaint = time.monotonic()
                stop.wait(0.5)
                continue
            if claimed is None:
                stop.wait(fr.POLL_INTERVAL_S)
                continue
            try:
                run_task(worker, address, claimed[0])
            except Exception:  # reporting the task's end failed: the next task may not
                logger.error("task end not reported:\n%s", traceback.format_exc())


def deployment_worker(node_config: dict[str, Any]) -> SiteWorker:
    """The deployment ClientApp with the site's data loaded once, not once per message."""
    from fedinfer.deploy.apps import build_deploy_client_app

    app: ClientApp = build_deploy_client_app(cache_site=True)
    return SiteWorker(app, node_config=node_config)


def _warm_imports() -> None:
    """Import what the handlers need now, not on the first message."""
    import fedinfer.deploy.bundle  # noqa: F401
    import fedinfer.fl.secagg_site  # noqa: F401
    import fedinfer.fl.site_privacy  # noqa: F401
    import fedinfer.privacy.noise  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Run the worker until SIGTERM / SIGINT."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--node-config", type=Path, required=True)
    parser.add_argument("--runtime-api", required=True, help="HOST:PORT of the SuperNode")
    parser.add_argument("--secret-file", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll (20 a second)
    worker = deployment_worker(load_node_config(args.node_config))
    _warm_imports()
    secret = args.secret_file.read_bytes()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logger.info("running the site's own ClientApp on tasks from %s", args.runtime_api)
    serve_tasks(worker, address=args.runtime_api, secret=secret, stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
