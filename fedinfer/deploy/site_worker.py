"""The site worker: the long-lived process of ``fedinfer site`` that runs the ClientApp handlers.

The per-message ``flwr-clientapp`` process only forwards (:mod:`fedinfer.deploy.forwarder`);
this process, started once per site, imports torch, Opacus and fedinfer once, keeps the site's
data loaded, and runs the same ClientApp as before (:func:`fedinfer.deploy.apps.
build_deploy_client_app`): the site's policy checks, its privacy ledger and the secure
aggregation replay guard run unchanged, and all their state stays in the state directory.

Who may submit a message: a Unix socket ``<state-dir>/clientapp.sock`` created 0600 inside
the 0700 state directory, and a peer whose uid (``SO_PEERCRED``) is this process's own. The
node config the handlers see is the site's own ``node-config.toml``, never what a peer sends.
Messages are handled one at a time, in arrival order, as the ClientApp processes of one
SuperNode did in practice; the ledger and the replay guard were written for that.

    python -m fedinfer.deploy.site_worker --state-dir DIR --node-config DIR/node-config.toml
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import tomllib
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedinfer.deploy.forwarder import (
    SOCKET_NAME,
    decode_request,
    encode_reply,
    read_frames,
    socket_address,
    write_frames,
)
from fedinfer.errors import ConfigError

__all__ = ["SiteWorker", "load_node_config", "main", "peer_uid", "serve_socket"]

logger = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]
_UCRED = struct.Struct("3i")


def load_node_config(path: Path) -> dict[str, Any]:
    """The site's node config, as its SuperNode parses ``--node-config`` (flat string values)."""
    with open(path, "rb") as handle:
        return dict(tomllib.load(handle))


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (None where unsupported)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(creds)[1])


class SiteWorker:
    """Runs messages through ``app`` with the site's own node config, one at a time.

    Parameters
    ----------
    app : ClientApp or callable
        The handlers (default in :func:`main`: the deployment ClientApp, with the site's
        data cached across messages).
    node_config : dict
        The site's node config; it replaces whatever node config a request carries.
    """

    def __init__(self, app: Handler, *, node_config: dict[str, Any]) -> None:
        self.app = app
        self.node_config = node_config
        self._lock = threading.Lock()

    def handle(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run one message; a crash becomes an ``Error`` reply, as Flower's runtime does."""
        context.node_config = dict(self.node_config)
        with self._lock:
            try:
                reply = self.app(message, context)
            except Exception as exc:  # the node must not die with one message
                logger.error("the ClientApp raised:\n%s", traceback.format_exc())
                reason = f"{type(exc)}:<'{exc}'>"
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
                reply = Message(error, reply_to=message)
        return reply, context


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    worker: SiteWorker
    allowed_uid: int


class _Connection(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        uid = peer_uid(sock)
        if uid is not None and uid != self.server.allowed_uid:
            logger.warning("refused a ClientApp connection from uid %d", uid)
            return
        try:
            message, context = decode_request(read_frames(sock, 3))
        except Exception as exc:  # channel errors, protobuf DecodeError, bad metadata
            logger.warning("refused a malformed request on the ClientApp channel: %r", exc)
            return
        logger.info("%s message %s", message.metadata.message_type, message.metadata.message_id)
        reply, context = self.server.worker.handle(message, context)
        with contextlib.suppress(OSError):  # the forwarder died: Flower retries the message
            write_frames(sock, *encode_reply(reply, context))


@contextlib.contextmanager
def serve_socket(
    worker: SiteWorker, state_dir: Path, *, allowed_uid: int | None = None
) -> Iterator[socketserver.BaseServer]:
    """Serve ``worker`` on ``<state_dir>/clientapp.sock`` (0600, directory 0700) in a thread.

    Only a peer with uid ``allowed_uid`` (default: this process's) is served.

    Raises
    ------
    ConfigError
        The state directory is readable or writable by others.
    """
    state_dir = Path(state_dir)
    if state_dir.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"state directory {state_dir} is open to others; `chmod 700` it")
    path = state_dir / SOCKET_NAME
    path.unlink(missing_ok=True)  # a previous worker's socket; the directory is ours alone
    previous = os.umask(0o177)  # the socket is born 0600: no window in which others may connect
    try:
        with socket_address(path) as address:
            server = _Server(address, _Connection)
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    server.worker = worker
    server.allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
    thread = threading.Thread(target=server.serve_forever, name="clientapp-channel", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        path.unlink(missing_ok=True)


def deployment_worker(node_config: dict[str, Any]) -> SiteWorker:
    """The deployment ClientApp with the site's data loaded once, not once per message."""
    from fedinfer.deploy.apps import build_deploy_client_app

    app: ClientApp = build_deploy_client_app(cache_site=True)
    return SiteWorker(app, node_config=node_config)


def _warm_imports() -> None:
    """Import what the handlers need now, not on the first message."""
    import fedinfer.fl.secagg_site  # noqa: F401
    import fedinfer.fl.site_privacy  # noqa: F401
    import fedinfer.privacy.noise  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Run the worker until SIGTERM / SIGINT."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--node-config", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    worker = deployment_worker(load_node_config(args.node_config))
    _warm_imports()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with serve_socket(worker, args.state_dir):
            logger.info("serving the ClientApp on %s", args.state_dir / SOCKET_NAME)
            stop.wait()
    except ConfigError as exc:
        print(f"site worker: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
