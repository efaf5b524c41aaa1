"""Bearer-token authentication, roles, and per-principal rate limiting.

The tokens file (JSON, mode 0600) stores only SHA-256 hashes of tokens::

    {"tokens": [{"principal": "clinic-a", "roles": ["infer"], "sha256": "...",
                 "created": "...", "rate_limit": null}]}

Tokens are 256-bit random strings, so a plain SHA-256 is a sound verifier (no
password stretching needed). Lookup hashes the presented token and compares it
with *every* stored hash using :func:`hmac.compare_digest`, so timing reveals
neither which entry matched nor how much of a hash did. The server re-reads the
file when it changes, so ``fedinfer tokens add`` takes effect without restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedinfer.errors import ConfigError
from fedinfer.fsutil import atomic_write_bytes

__all__ = [
    "ANONYMOUS",
    "ROLES",
    "LoginLimiter",
    "Principal",
    "RateLimiter",
    "TokenFile",
    "add_token",
    "revoke_tokens",
]

ROLES: tuple[str, ...] = ("admin", "infer")
"""``infer``: metadata and inference. ``admin``: everything, including rollback."""

TOKEN_PREFIX = "fi_"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    name: str
    roles: frozenset[str]
    rate_limit: float | None = None
    """Requests per second for this principal; None: the server default."""

    def can(self, role: str) -> bool:
        """Whether this principal holds ``role`` (``admin`` implies every role)."""
        return role in self.roles or "admin" in self.roles


ANONYMOUS = Principal("anonymous", frozenset({"infer"}))
"""Who calls a server started without ``--auth-tokens``: inference only, never admin."""


class TokenFile:
    """Hashed bearer tokens read from ``path`` (re-read when the file changes).

    Examples
    --------
    >>> tokens = TokenFile(Path("site/tokens.json"))  # doctest: +SKIP
    >>> tokens.authenticate("fi_...")  # doctest: +SKIP
    Principal(name='clinic-a', roles=frozenset({'infer'}), rate_limit=None)
    """

    def __init__(self, path: Path, *, recheck_s: float = 1.0) -> None:
        self.path = Path(path)
        self._recheck_s = recheck_s
        self._checked = 0.0
        self._mtime: int | None = None
        self._entries: list[tuple[str, Principal]] = []
        self._reload()

    def authenticate(self, token: str) -> Principal | None:
        """Return the principal holding ``token``, or None (constant-time in the match)."""
        self._maybe_reload()
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        found: Principal | None = None
        for stored, principal in self._entries:  # no early exit: compare with every entry
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked >= self._recheck_s:
            self._checked = now
            try:
                mtime = self.path.stat().st_mtime_ns
            except OSError:
                return  # keep the last good set if the file vanishes briefly
            if mtime != self._mtime:
                try:
                    self._reload()
                except ConfigError as exc:  # a half-edited file must not lock everyone out
                    logger.error("keeping the previous tokens: %s", exc)

    def _reload(self) -> None:
        data = _read(self.path, missing_ok=False)
        entries = []
        for i, item in enumerate(data["tokens"]):
            try:
                roles = frozenset(item["roles"])
                principal = Principal(str(item["principal"]), roles, item.get("rate_limit"))
                entries.append((str(item["sha256"]), principal))
            except (KeyError, TypeError):
                raise ConfigError(
                    f"{self.path}: token entry {i} is malformed; recreate it with "
                    "`fedinfer tokens add`"
                ) from None
        self._entries = entries
        self._mtime = self.path.stat().st_mtime_ns


def _read(path: Path, *, missing_ok: bool) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return {"tokens": []}
        raise ConfigError(
            f"`--auth-tokens` file {path} does not exist; create it with "
            "`fedinfer tokens add --file PATH --principal NAME --role infer`"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read tokens file {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
        raise ConfigError(f"{path} is not a fedinfer tokens file (no 'tokens' list)")
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(Path(path), json.dumps(data, indent=2).encode("utf-8"))  # 0600


def add_token(
    path: Path, *, principal: str, roles: list[str], rate_limit: float | None = None
) -> str:
    """Create a token for ``principal`` with ``roles``; store its hash; return the token.

    The token itself is never stored: show it to the user once.

    Examples
    --------
    >>> token = add_token(Path("t.json"), principal="clinic-a", roles=["infer"])  # doctest: +SKIP
    """
    bad = sorted(set(roles) - set(ROLES))
    if bad or not roles:
        raise ConfigError(f"`--role` must be one of {', '.join(ROLES)} (got {roles})")
    if not principal or not principal.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(
            f"`--principal` must be letters, digits, '-', '_' or '.' (got {principal!r})"
        )
    if rate_limit is not None and rate_limit <= 0:
        raise ConfigError(f"`--rate-limit` must be > 0 requests/s (got {rate_limit})")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    data = _read(path, missing_ok=True)
    data["tokens"].append(
        {
            "principal": principal,
            "roles": sorted(set(roles)),
            "sha256": hashlib.sha256(token.encode("utf-8")).hexdigest(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "rate_limit": rate_limit,
        }
    )
    _write(path, data)
    return token


def revoke_tokens(path: Path, *, principal: str) -> int:
    """Delete every token of ``principal``; return how many were removed."""
    data = _read(path, missing_ok=False)
    kept = [t for t in data["tokens"] if t.get("principal") != principal]
    removed = len(data["tokens"]) - len(kept)
    data["tokens"] = kept
    _write(path, data)
    return removed


class RateLimiter:
    """Token bucket per principal: ``rate`` requests/s sustained, ``burst`` at once.

    Parameters
    ----------
    rate : float
        Default sustained rate; 0 disables limiting for principals without their own.
    burst : float or None
        Bucket size (default: max(1, rate)).
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate < 0 or (burst is not None and burst < 1):
            raise ConfigError(
                f"`--rate-limit` must be >= 0 and `--rate-burst` >= 1 (got {rate}, {burst})"
            )
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, principal: Principal) -> float:
        """Take one token; return 0.0 if allowed, else the seconds until one is available."""
        rate = principal.rate_limit or self.rate
        if rate <= 0:
            return 0.0
        capacity = self.burst if self.burst is not None else max(1.0, rate)
        now = time.monotonic()
        level, last = self._buckets.get(principal.name, (capacity, now))
        level = min(capacity, level + (now - last) * rate)
        if level >= 1.0:
            self._buckets[principal.name] = (level - 1.0, now)
            return 0.0
        self._buckets[principal.name] = (level, now)
        return (1.0 - level) / rate


class LoginLimiter:
    """Failed-login budget per client address, checked *before* a token is looked at.

    Each address may fail ``per_minute`` times in a burst, refilled at
    ``per_minute`` per minute; while its budget is spent every request from it
    that needs a token is answered 429, so tokens cannot be guessed at line
    rate. A correct token costs nothing.

    Parameters
    ----------
    per_minute : float
        Failed logins allowed per address and minute (default: 10).
    max_addresses : int
        Addresses tracked at most; beyond it the fully refilled ones are forgotten.
    """

    def __init__(self, per_minute: float = 10.0, *, max_addresses: int = 65536) -> None:
        if per_minute <= 0:
            raise ConfigError(f"`--login-failures-per-min` must be > 0 (got {per_minute})")
        self.capacity = max(1.0, per_minute)
        self.rate = per_minute / 60.0
        self.max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}

    def wait_s(self, address: str) -> float:
        """0.0 if ``address`` may try a token now, else seconds until it may."""
        level = self._level(address, time.monotonic())
        return 0.0 if level >= 1.0 else (1.0 - level) / self.rate

    def failed(self, address: str) -> None:
        """Charge one failed login to ``address``."""
        now = time.monotonic()
        level = self._level(address, now)
        if len(self._buckets) >= self.max_addresses and address not in self._buckets:
            self._forget_idle(now)
        self._buckets[address] = (max(0.0, level - 1.0), now)

    def _level(self, address: str, now: float) -> float:
        level, last = self._buckets.get(address, (self.capacity, now))
        return min(self.capacity, level + (now - last) * self.rate)

    def _forget_idle(self, now: float) -> None:
        for address in [a for a in self._buckets if self._level(a, now) >= self.capacity]:
            del self._buckets[address]
