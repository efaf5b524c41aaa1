"""Read and write a site policy file (TOML), strictly: an unknown key or a bad value is an error."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from fedinfer.errors import ConfigError
from fedinfer.policy.peers import load_peers
from fedinfer.policy.schema import PRIVACY_MODES, SitePolicy

__all__ = [
    "POLICY_FILENAME",
    "load_policy",
    "policy_from_mapping",
    "save_policy",
    "validate_policy",
]

POLICY_FILENAME = "site_policy.toml"

_HEADER = (
    "# fedinfer site policy: what this site accepts from a coordinator and what may leave it.\n"
    "# Every key is documented in fedinfer/policy/schema.py and the README's 'Site policy'.\n"
)


def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(SitePolicy)}


def _typed(key: str, value: Any, source: str) -> Any:
    """``value`` checked against ``SitePolicy.<key>``'s type; ints are accepted for floats."""
    kind = str(_fields()[key].type)
    optional = "None" in kind
    if value is None and optional:
        return None
    if kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.startswith("float"):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind.startswith("list"):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{source}: `{key}` must be {kind} (got {value!r})")
    return value


def validate_policy(policy: SitePolicy, *, source: str = "site policy") -> SitePolicy:
    """Check every value's range; collect every problem, then raise once naming the keys.

    A ``secagg_trusted_peers`` file is read and checked too (a relative path is relative
    to the working directory here; :func:`load_policy` makes it relative to the policy).
    """
    problems = []
    if policy.privacy_mode not in PRIVACY_MODES:
        problems.append(f"`privacy_mode` must be one of {', '.join(PRIVACY_MODES)}")
    if not (policy.max_epsilon > 0 and math.isfinite(policy.max_epsilon)):
        problems.append("`max_epsilon` must be a finite number > 0")
    if policy.delta is not None and not 0 < policy.delta < 1:
        problems.append("`delta` must be in (0, 1), or absent for 1 / (10 * samples)")
    if policy.min_noise_multiplier < 0:
        problems.append("`min_noise_multiplier` must be >= 0")
    if not 0 < policy.max_sample_rate <= 1:
        problems.append("`max_sample_rate` must be in (0, 1]")
    if policy.max_local_epochs < 1:
        problems.append("`max_local_epochs` must be >= 1")
    if policy.max_steps_per_round is not None and policy.max_steps_per_round < 1:
        problems.append("`max_steps_per_round` must be >= 1, or absent")
    if not 0 <= policy.secagg_min_threshold <= 1:
        problems.append("`secagg_min_threshold` must be a fraction in [0, 1]")
    if policy.secagg_min_participants < 2:
        problems.append("`secagg_min_participants` must be >= 2")
    if policy.secagg_trusted_peers is not None:
        try:
            load_peers(Path(policy.secagg_trusted_peers))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return policy


def policy_from_mapping(data: dict[str, Any], *, source: str = "site policy") -> SitePolicy:
    """Build a :class:`SitePolicy` from a mapping; an unknown key is named with the known ones."""
    known = _fields()
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key `{unknown[0]}`; known keys: {', '.join(sorted(known))}"
        )
    values = {key: _typed(key, value, source) for key, value in data.items()}
    return validate_policy(SitePolicy(**values), source=source)


def load_policy(path: Path) -> SitePolicy:
    """Load a policy file.

    Raises
    ------
    ConfigError
        The file is missing, not TOML, has an unknown key or a bad value (the key is named).

    Examples
    --------
    >>> save_policy(SitePolicy(max_epsilon=4.0), tmp / "site_policy.toml")  # doctest: +SKIP
    >>> load_policy(tmp / "site_policy.toml").max_epsilon  # doctest: +SKIP
    4.0
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"site policy {path} does not exist; write the strict default with "
            f"`fedinfer site init-policy {path.parent}` and edit it"
        )
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"site policy {path} is not valid TOML: {exc}") from None
    peers = data.get("secagg_trusted_peers")
    if isinstance(peers, str) and peers and not Path(peers).is_absolute():
        data["secagg_trusted_peers"] = str(path.parent / peers)  # next to the policy
    return policy_from_mapping(data, source=f"site policy {path}")


def save_policy(policy: SitePolicy, path: Path, *, overwrite: bool = False) -> Path:
    """Write ``policy`` as TOML (None values left out: absent means None), readable by the owner."""
    path = Path(path)
    peers = policy.secagg_trusted_peers
    if peers is not None and not Path(peers).is_absolute():  # as load_policy will read it
        validate_policy(dataclasses.replace(policy, secagg_trusted_peers=str(path.parent / peers)))
    else:
        validate_policy(policy)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; edit it, or delete it to write a new default")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in dataclasses.asdict(policy).items() if v is not None}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_HEADER + tomli_w.dumps(data))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path
