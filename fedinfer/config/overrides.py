"""Hydra overrides checked against the config schema before anything runs.

Hydra reports a mistyped key, an unknown group option or a value of the wrong type in a
multi-line message (exit 1), and a ``+key=value`` for a key that the schema does not have is
accepted and then silently dropped when the config becomes a :class:`FedInferConfig`.
:func:`check_overrides` finds all of these first, for every value of a ``-m`` sweep, and
raises one :class:`~fedinfer.errors.ConfigError` naming each key with a "did you mean".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedinfer.config.schema import FedInferConfig
from fedinfer.config.validate import did_you_mean
from fedinfer.errors import ConfigError

__all__ = ["check_overrides", "config_groups", "schema_keys"]


def schema_keys(node: object | None = None, prefix: str = "") -> tuple[list[str], list[str]]:
    """Every dotted key of the schema, and the keys of free-form mappings (``model.kwargs``).

    Examples
    --------
    >>> keys, free = schema_keys()
    >>> "federation.num_sites" in keys, free
    (True, ['model.kwargs'])
    """
    node = FedInferConfig() if node is None else node
    keys: list[str] = []
    free: list[str] = []
    for f in dataclasses.fields(node):  # type: ignore[arg-type]
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        keys.append(key)
        if dataclasses.is_dataclass(value):
            sub_keys, sub_free = schema_keys(value, prefix=f"{key}.")
            keys += sub_keys
            free += sub_free
        elif isinstance(value, dict):
            free.append(key)
    return keys, free


def config_groups(conf: Path) -> dict[str, list[str]]:
    """The config groups under ``conf`` and their options (Hydra's own ``hydra/`` excluded)."""
    return {
        group.name: sorted(p.stem for p in group.glob("*.yaml"))
        for group in sorted(conf.iterdir())
        if group.is_dir() and group.name != "hydra"
    }


def check_overrides(
    overrides: Sequence[str], *, conf: Path, extra_conf: Path | None = None
) -> None:
    """Raise one ConfigError for every override that Hydra would refuse or silently drop.

    Checked: the override syntax; ``group=option`` against the options in ``conf/``; every
    key against the schema (``+key`` only below a free-form mapping such as
    ``model.kwargs``); every value (each value of a sweep) against the key's type. Keys of
    Hydra itself (``hydra.*``, ``hydra/*``) are left to Hydra. ``extra_conf`` is a
    ``--config-dir`` whose groups add to those of ``conf``.

    Examples
    --------
    >>> from fedinfer.config.store import conf_dir
    >>> check_overrides(["federaton.num_sites=3"], conf=conf_dir())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    fedinfer.errors.ConfigError: unknown config key `federaton.num_sites`; did you mean ...
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except HydraException as exc:
            lines = [x for x in str(exc).splitlines() if x.strip() and "hydra.cc" not in x]
            reason = lines[-1].strip() if lines else "syntax error"  # "missing EQUAL at '<EOF>'"
            raise ConfigError(
                f"cannot parse the override {line!r} ({reason}); write key=value, group=option, "
                "+key=value or ~key"
            ) from exc
    groups = config_groups(conf)
    if extra_conf is not None and extra_conf.is_dir():
        for group, options in config_groups(extra_conf).items():
            groups[group] = sorted({*groups.get(group, []), *options})
    keys, free = schema_keys()
    typed = _TypedConfig()
    problems: list[str] = []
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or override.package:
            continue
        if key in groups and (override.is_add() or override.is_force_add()):
            problems.append(
                f"`{override.input_line}`: conf/config.yaml already picks a {key} option; "
                f"drop the `+` (`{override.input_line.lstrip('+')}`)"
            )
        elif key in groups and not override.is_delete():
            problems += _check_group(key, list(_values(override)), groups[key])
        else:
            problem = _check_key(override, keys=keys, free=free, groups=list(groups))
            if problem:
                problems.append(problem)
            elif not override.is_delete():
                problems += typed.check(key, _values(override))
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))


def _values(override: Any) -> Iterator[Any]:
    """The values of an override: one, every value of a discrete sweep, none of an interval."""
    if not override.is_sweep_override():
        yield override.value()
    elif override.is_discrete_sweep():
        try:
            yield from override.sweep_iterator()
        except Exception:  # noqa: BLE001 - glob()/shuffle() of unusual types: Hydra decides
            return


def _check_group(group: str, values: list[Any], options: list[str]) -> list[str]:
    problems = []
    for value in values:
        if value is None or str(value) in options:
            continue
        hint = did_you_mean(str(value), options, template=f"`{group}={{}}`")
        problems.append(
            f"`{group}={value}` is not a {group} option (choose one of {', '.join(options)}){hint}"
        )
    return problems


def _check_key(override: Any, *, keys: list[str], free: list[str], groups: list[str]) -> str:
    """The problem with the key of a non-group override, or ''."""
    key: str = override.key_or_group
    written = override.input_line or key
    under_free = any(key.startswith(f"{f}.") for f in free)
    if key in keys:
        if override.is_add():
            return (
                f"`{written}`: `{key}` already exists; drop the `+` "
                f"(`{written.lstrip('+')}`)"
            )
        return ""
    if under_free:
        if override.is_add() or override.is_force_add() or override.is_delete():
            return ""
        return f"`{key}` is not set yet; add it with a `+`: `+{written}`"
    value = written.partition("=")[2] if "=" in written else ""
    template = f"`{{}}={value}`" if value else "`{}`"
    hint = did_you_mean(key, keys + groups, template=template)
    if override.is_add() or override.is_force_add():
        return (
            f"`{written}` adds a key that the config schema does not have (the run would "
            f"ignore it; `+` adds keys only under {', '.join(free)}){hint}"
        )
    return f"unknown config key `{key}`{hint}"


class _TypedConfig:
    """The schema as a typed OmegaConf object: assigning a value checks its type."""

    def __init__(self) -> None:
        from omegaconf import OmegaConf

        self.cfg = OmegaConf.structured(FedInferConfig)

    def check(self, key: str, values: Iterator[Any]) -> list[str]:
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        problems = []
        for value in values:
            if isinstance(value, str) and "${" in value:
                continue  # an interpolation: resolved (and checked) when the job starts
            try:
                OmegaConf.update(self.cfg, key, value, merge=True)
            except OmegaConfBaseException as exc:
                problems.append(f"`{key}={_show(value)}`: {_first_line(exc)}")
        return problems


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__
