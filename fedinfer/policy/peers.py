"""A site's trusted secure-aggregation peers: site name -> identity public key, in TOML.

Each site has a long-lived Ed25519 identity key (``STATE_DIR/secagg/identity.key``) that
endorses its keys for every run. A site whose policy names a peers file
(``secagg_trusted_peers``) joins only rounds whose every other participant is endorsed by
one of the listed keys, each by a different one: a coordinator cannot fill a round with
sites of its own making (Sybils) whose shares would unmask one real site's update.

The file holds public keys only, one line per site, exactly what ``fedinfer site identity``
prints; the operators of the sites exchange those lines out of band and compare the
fingerprints (:func:`identity_fingerprint`) over a second channel::

    # fedinfer secure-aggregation peers: site name = identity public key (hex)
    hospital-a = "9b1f...e2"  # fingerprint 4c1d...

Examples
--------
>>> path = save_peers({"a": bytes(32)}, tmp / "secagg_peers.toml")  # doctest: +SKIP
>>> load_peers(path)  # doctest: +SKIP
{'a': b'\\x00\\x00...'}
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

from fedinfer.errors import ConfigError
from fedinfer.fsutil import atomic_write_bytes

__all__ = [
    "PEERS_FILENAME",
    "identity_fingerprint",
    "load_peers",
    "peer_line",
    "save_peers",
]

PEERS_FILENAME = "secagg_peers.toml"
"""Where ``fedinfer deploy local`` writes each site's list, next to its policy."""

_KEY = "secagg_trusted_peers"
_IDENTITY_BYTES = 32
_HEADER = (
    "# fedinfer secure-aggregation peers: site name = identity public key (hex).\n"
    "# A line per real site, as `fedinfer site identity STATE_DIR --name NAME` prints it on that\n"
    "# site; compare each fingerprint with the site's operator over another channel.\n"
)
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def identity_fingerprint(public: bytes) -> str:
    """Short hex id of an identity public key: the first 16 bytes of SHA-256 over it.

    The same rule as the coordinator key's fingerprint (:func:`fedinfer.artifacts.key_fingerprint`).

    Examples
    --------
    >>> identity_fingerprint(bytes(32))
    '66687aadf862bd776c8fc18b8e9f8e20'
    """
    return hashlib.sha256(public).hexdigest()[:32]


def peer_line(name: str, public: bytes) -> str:
    """One entry of a peers file: ``name = "<hex key>"  # fingerprint <fp>``.

    Examples
    --------
    >>> peer_line("site-00", bytes(32))[:21]
    'site-00 = "0000000000'
    """
    key = name if _BARE.fullmatch(name) else json.dumps(name)
    return f'{key} = "{public.hex()}"  # fingerprint {identity_fingerprint(public)}'


def save_peers(peers: Mapping[str, bytes], path: Path) -> Path:
    """Write ``peers`` (site name -> raw identity public key) as a peers file, atomically."""
    text = _HEADER + "".join(peer_line(n, peers[n]) + "\n" for n in sorted(peers))
    load_peers_text(text, source=str(path))  # never write a file the site would refuse
    return atomic_write_bytes(Path(path), text.encode(), mode=0o644)


def load_peers(path: Path) -> dict[str, bytes]:
    """Read a peers file: site name -> raw 32-byte identity public key.

    Raises
    ------
    ConfigError
        Naming ``secagg_trusted_peers``: the file is missing, not TOML, empty, or holds a
        value that is not a 64-hex-digit key, or the same key under two names.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"`{_KEY}` names {path}, which does not exist; write it with one "
            "`fedinfer site identity` line per peer, or remove the key"
        )
    return load_peers_text(path.read_text(errors="replace"), source=str(path))


def load_peers_text(text: str, *, source: str) -> dict[str, bytes]:
    """Parse the text of a peers file (see :func:`load_peers`)."""
    where = f"`{_KEY}` file {source}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    if not data:
        raise ConfigError(f"{where} lists no peer; add a `fedinfer site identity` line per site")
    peers: dict[str, bytes] = {}
    for name, value in data.items():
        if not (isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{64}", value)):
            raise ConfigError(
                f"{where}: `{name}` must be a {_IDENTITY_BYTES}-byte key as 64 hex digits, in "
                f"quotes (got {value!r}); copy the line `fedinfer site identity` prints"
            )
        peers[name] = bytes.fromhex(value)
    by_key: dict[bytes, str] = {}
    for name, key in peers.items():
        if key in by_key:
            raise ConfigError(
                f"{where}: `{by_key[key]}` and `{name}` have the same key; one site, one line"
            )
        by_key[key] = name
    return peers
