"""Shared fixtures: a private dataset cache per test session, tiny fast configs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from fedinfer.config import FedInferConfig, load_config

TINY = (
    "simulation.runtime=inprocess",
    "dataset.num_samples=1200",
    "federation.num_sites=4",
    "federation.rounds=2",
    "federation.local_epochs=1",
    "serving.enabled=false",
    "simulation.progress=false",
)


@pytest.fixture(autouse=True, scope="session")
def _dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep generated datasets out of the user's home cache."""
    os.environ.setdefault("FEDINFER_CACHE", str(tmp_path_factory.mktemp("cache")))


def tiny_config(*overrides: str, base: Sequence[str] = TINY) -> FedInferConfig:
    """A few-second federation: 4 sites, 2 rounds, in-process."""
    return load_config([*base, *overrides])


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def example_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo what a shipped example's ``main`` changes in this process: the model allow-list,
    ``PYTHONPATH`` and ``sys.path`` (each example allows and imports its own package)."""
    import os
    import sys

    from fedinfer.models.custom import ALLOW_ENV

    monkeypatch.setenv(ALLOW_ENV, "")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(sys, "path", list(sys.path))
