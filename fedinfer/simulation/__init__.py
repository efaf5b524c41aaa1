"""Run federations in Flower's simulation runtime."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedinfer.simulation.run import SimulationResult, run_simulation

__all__ = ["SimulationResult", "run_simulation"]


def __getattr__(name: str) -> Any:
    # Flower and torch are imported on first use: `fedinfer simulate --help` and a mistyped
    # override answer without them.
    if name in __all__:
        from fedinfer.simulation import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
