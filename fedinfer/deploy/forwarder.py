"""A deployed site's per-message ClientApp: forward the message to the site's long-lived worker.

Flower's SuperNode runs a fresh ``flwr-clientapp`` process for every message. Importing
torch, Opacus and fedinfer in each of them cost ~4 s per message; so the ClientApp that
``clients/app.py`` exports is this thin forwarder, which imports only Flower and the standard
library. It hands the message and its context, serialized with Flower's own protobuf
serialization (never pickle), to the site worker (:mod:`fedinfer.deploy.site_worker`), a
process of ``fedinfer site`` that holds the data, the model code and the imported libraries,
and runs the real handlers (policy checks, privacy ledger, secure aggregation) exactly as the
in-process ClientApp did. The forwarder keeps no state of its own: Flower's ``Context.state``
goes to the worker and its update comes back, everything else lives in the worker and the
state directory.

The channel is a Unix socket in the site's state directory (``clientapp.sock``): the directory
is 0700, the socket 0600, and the worker also checks the peer's uid (``SO_PEERCRED``), so only
the site's own user can submit a message. If the worker is not reachable the forwarder replies
with an ``Error`` that says so (it never waits for one to appear).

Wire format, both directions: frames of an 8-byte big-endian length and a payload. Request:
``MAGIC``, ``Context`` proto, ``Message`` proto. Reply: ``MAGIC``, ``Message`` proto,
``Context`` proto.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

__all__ = [
    "MAGIC",
    "SOCKET_NAME",
    "WORKER_UNREACHABLE",
    "ForwardingClientApp",
    "build_forwarder_app",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "forward",
    "read_frames",
    "socket_address",
    "write_frames",
]

MAGIC = b"fedinfer-clientapp/1"
SOCKET_NAME = "clientapp.sock"
STATE_DIR_KEY = "state-dir"  # fedinfer.fl.run_config.NodeConfigKeys.STATE_DIR (not imported: heavy)
WORKER_UNREACHABLE = 4007  # fedinfer.fl.messages.ErrorCodes.WORKER_UNREACHABLE
MAX_FRAME = 1 << 32
"""Largest frame either side accepts (4 GiB): a bound, not a limit any model reaches."""
CONNECT_TIMEOUT_S = 10.0
_LENGTH = struct.Struct(">Q")
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS


class ChannelError(Exception):
    """The channel to the site worker broke (closed early, bad frame, wrong magic)."""


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits ``sun_path``: the path, or ``/proc/self/fd/N/<name>``.

    A state directory can sit deeper than a Unix socket's 108-byte path allows; on Linux the
    directory is then reached through an open descriptor of it, for the duration of the block.
    """
    if len(os.fsencode(str(path))) < _UNIX_PATH_MAX or not Path("/proc/self/fd").is_dir():
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def write_frames(sock: socket.socket, *payloads: bytes) -> None:
    """Send ``payloads``, each as an 8-byte length and its bytes."""
    for payload in payloads:
        sock.sendall(_LENGTH.pack(len(payload)))
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ChannelError(f"the peer closed the channel with {left} of {size} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frames(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` frames (see :func:`write_frames`); the first must be :data:`MAGIC`."""
    frames = []
    for _ in range(count):
        (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
        if size > MAX_FRAME:
            raise ChannelError(f"a frame of {size} bytes exceeds the {MAX_FRAME}-byte bound")
        frames.append(_recv_exact(sock, size))
    if frames and frames[0] != MAGIC:
        raise ChannelError("the peer does not speak the fedinfer ClientApp channel")
    return frames


def encode_request(message: Message, context: Context) -> tuple[bytes, bytes, bytes]:
    """The request frames for ``message`` and ``context`` (Flower's protobuf serialization)."""
    return (
        MAGIC,
        context_to_proto(context).SerializeToString(),
        message_to_proto(message).SerializeToString(),
    )


def decode_request(frames: list[bytes]) -> tuple[Message, Context]:
    """Inverse of :func:`encode_request` (``frames`` as :func:`read_frames` returns them)."""
    context = context_from_proto(ProtoContext.FromString(frames[1]))
    return message_from_proto(ProtoMessage.FromString(frames[2])), context


def encode_reply(reply: Message, context: Context) -> tuple[bytes, bytes, bytes]:
    """The reply frames: the reply message and the context with its updated state."""
    return (
        MAGIC,
        message_to_proto(reply).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )


def decode_reply(frames: list[bytes]) -> tuple[Message, Context]:
    """Inverse of :func:`encode_reply`."""
    reply = message_from_proto(ProtoMessage.FromString(frames[1]))
    return reply, context_from_proto(ProtoContext.FromString(frames[2]))


def _unreachable(message: Message, reason: str) -> Message:
    return Message(Error(code=WORKER_UNREACHABLE, reason=reason), reply_to=message)


def forward(message: Message, context: Context) -> Message:
    """Hand ``message`` to the site worker and return its reply; ``context.state`` is updated.

    Never raises for a missing or broken worker: the reply is then an ``Error`` with code
    :data:`WORKER_UNREACHABLE` naming the socket, so the coordinator records why.
    """
    state_dir = context.node_config.get(STATE_DIR_KEY)
    if not state_dir:
        return _unreachable(
            message,
            f"the SuperNode's node config has no `{STATE_DIR_KEY}`; start sites with "
            "`fedinfer site`",
        )
    path = Path(str(state_dir)) / SOCKET_NAME
    try:
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
            socket_address(path) as address,
        ):
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(address)
            sock.settimeout(None)  # a training round takes as long as it takes
            write_frames(sock, *encode_request(message, context))
            reply, updated = decode_reply(read_frames(sock, 3))
    except (OSError, ChannelError) as exc:
        return _unreachable(
            message,
            f"the site worker at {path} is not reachable ({type(exc).__name__}: {exc}); is "
            "`fedinfer site` running for this state directory? (its log: logs/worker.log)",
        )
    context.state = updated.state
    return reply


class ForwardingClientApp(ClientApp):
    """A ClientApp that forwards every message, whatever its type, to the site worker."""

    def __call__(self, message: Message, context: Context) -> Message:  # noqa: D102
        return forward(message, context)


def build_forwarder_app() -> ClientApp:
    """Build the ClientApp that ``clients/app.py`` exports for a deployment."""
    return ForwardingClientApp()
