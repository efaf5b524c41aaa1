"""Run federations in Flower's simulation runtime."""

from fedinfer.simulation.run import SimulationResult, run_simulation

__all__ = ["SimulationResult", "run_simulation"]
