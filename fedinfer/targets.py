"""Import a user's function by dotted path, only when the site's operator allow-listed it.

A config names code to run (``model._target_``, ``dataset._target_``); in a deployment that
config comes from the coordinator, so a site imports nothing the coordinator names unless the
site's own environment variable lists it. One rule for every kind of target:

- ``$FEDINFER_MODEL_TARGETS`` / ``$FEDINFER_DATA_TARGETS`` hold comma-separated entries; an
  entry matches a target exactly, or ``pkg.mod.*`` matches every target under ``pkg.mod.``;
- the target must be a dotted import path (letters, digits, ``_`` and ``.``), checked before
  anything is imported;
- an import failure is a :class:`~fedinfer.errors.ConfigError` naming the key and the fix.

Light on purpose (no torch): the CLI's preflight checks use it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedinfer.errors import ConfigError

__all__ = ["DATA_TARGETS", "MODEL_TARGETS", "TargetAllowList"]


@dataclass(frozen=True)
class TargetAllowList:
    """The allow-list in ``env_var`` for the config key ``key`` (e.g. ``model._target_``)."""

    env_var: str
    key: str

    def entries(self) -> tuple[str, ...]:
        """The entries of ``$env_var``, blanks dropped."""
        raw = os.environ.get(self.env_var, "")
        return tuple(entry.strip() for entry in raw.split(",") if entry.strip())

    def allow(self, target: str) -> None:
        """Add ``target`` to this process's allow-list (and its children's).

        Only for a run whose own config is the site's config (a simulation on one machine,
        ``deploy local``); a deployed site sets the variable itself.
        """
        current = self.entries()
        if target not in current:
            os.environ[self.env_var] = ",".join((*current, target))

    def check(self, target: str) -> None:
        """Raise :class:`ConfigError` unless the allow-list names ``target``."""
        if not isinstance(target, str) or not target.replace(".", "").replace("_", "").isalnum():
            raise ConfigError(f"`{self.key}` {target!r} is not a dotted import path")
        for entry in self.entries():
            if entry == target or (entry.endswith(".*") and target.startswith(entry[:-1])):
                return
        raise ConfigError(
            f"`{self.key}` {target!r} is not on this site's allow-list; "
            f"the site operator must set {self.env_var}={target} (or a 'package.*' prefix)"
        )

    def load(self, target: str) -> Callable[..., Any]:
        """Check ``target`` against the allow-list, import it, and return it (a callable)."""
        self.check(target)
        module_name, _, attr = target.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # ImportError, AttributeError, or the module's own errors
            reason = " ".join(str(exc).split())
            raise ConfigError(
                f"`{self.key}` {target!r} cannot be imported ({reason}); "
                "put its package on PYTHONPATH or install it"
            ) from None
        if not callable(obj):
            raise ConfigError(f"`{self.key}` {target!r} is not callable")
        return obj  # type: ignore[no-any-return]


MODEL_TARGETS = TargetAllowList("FEDINFER_MODEL_TARGETS", "model._target_")
DATA_TARGETS = TargetAllowList("FEDINFER_DATA_TARGETS", "dataset._target_")
