"""Hydra entry point for simulations and sweeps; every line of logic lives in ``fedinfer``.

python simulations/run.py federation.rounds=5                # one run (conf/config.yaml)
python simulations/run.py -m seed=1,2,3                      # a multirun
python simulations/run.py --config-dir simulations --config-name privacy_utility -m
# a ready-made sweep, the same as
# `fedinfer sweep privacy_utility`
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fedinfer.config.store import register_configs
from fedinfer.simulation.hydra_main import simulate_job

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; returns its final accuracy (the objective for the Optuna sweeper)."""
    return simulate_job(cfg)


if __name__ == "__main__":
    main()
