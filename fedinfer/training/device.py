"""Device selection: CUDA whenever one is visible, unless told otherwise."""

from __future__ import annotations

import torch

from fedinfer.errors import ConfigError

__all__ = ["select_device"]


def select_device(preference: str = "auto") -> torch.device:
    """Return the torch device for ``simulation.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Examples
    --------
    >>> select_device("cpu")
    device(type='cpu')
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cpu":
        return torch.device("cpu")
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"`simulation.device`={preference!r} but no CUDA device is visible; "
                "use simulation.device=auto or cpu"
            )
        return torch.device(preference)
    raise ConfigError(f"`simulation.device` must be auto, cpu or cuda[:N] (got {preference!r})")
