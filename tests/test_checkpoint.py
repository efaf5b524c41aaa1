"""Coordinator checkpoints: a crashed federation resumed from its last round ends bit-identical."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from fedinfer.artifacts import generate_signing_key, read_weights, save_public_key, verify_artifact
from fedinfer.config import FedInferConfig
from fedinfer.data import build_federated_data
from fedinfer.errors import ConfigError
from fedinfer.fl.checkpoint import checkpoint_path, load_checkpoint
from fedinfer.fl.client_app import build_client_app
from fedinfer.fl.coordinator import CoordinatorResult, ModelShape, run_coordinator
from fedinfer.fl.grid import InProcessGrid
from fedinfer.fl.site import simulation_resolver
from fedinfer.fl.strategy import build_strategy
from tests.conftest import tiny_config as _tiny_config

KEY = generate_signing_key()


def tiny_config(*overrides: str) -> FedInferConfig:
    """Logistic regression keeps each federation about a second."""
    return _tiny_config("model=logreg", *overrides)


class CoordinatorCrash(RuntimeError):
    """Stands for the coordinator process dying mid-round."""


class CrashingGrid(InProcessGrid):
    """The real in-process grid; the coordinator "dies" when round ``crash_round`` trains."""

    def __init__(self, *args: object, crash_round: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.crash_round, self.train_calls = crash_round, 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_calls += 1
            if self.train_calls == self.crash_round:
                raise CoordinatorCrash(f"killed while round {self.crash_round} trained")
        return super().send_and_receive(messages, timeout=timeout)


def _coordinate(
    cfg: FedInferConfig, out: Path, *, crash_round: int = 0, resume: bool = False
) -> CoordinatorResult:
    data = build_federated_data(cfg)
    out.mkdir(parents=True, exist_ok=True)
    public = save_public_key(KEY, out / "signing.pub")
    app = build_client_app(
        config_fn=lambda context: cfg,
        resolver_fn=lambda c: simulation_resolver(c, output_dir=out, coordinator_public_key=public),
    )
    grid = CrashingGrid(
        app, num_nodes=cfg.federation.num_sites, run_id=1, seed=cfg.seed, crash_round=crash_round
    )
    return run_coordinator(
        grid,
        cfg=cfg,
        shape=ModelShape(data.input_dim, data.num_classes),
        output_dir=out,
        run_id=f"run-{out.name}",
        signing_key=KEY,
        central_test=data.pooled_test,
        resume=resume,
    )


def _final(out: Path) -> dict[str, np.ndarray]:
    return read_weights(out / "model", verify_artifact(out / "model", public_key=KEY.public_key()))


@pytest.mark.parametrize(
    "strategy", ["fedavgm", "fedadam"], ids=["fedavgm-momentum", "fedadam-moments"]
)
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, strategy: str) -> None:
    """Crash while round 2 trains, resume: same final model bit for bit, same sites sampled."""
    # Prepare
    cfg = tiny_config(
        "privacy=none",
        "secagg=off",
        f"strategy={strategy}",
        "federation.rounds=3",
        "federation.fraction_train=0.5",
    )
    _coordinate(cfg, tmp_path / "straight")
    # Execute
    with pytest.raises(CoordinatorCrash):
        _coordinate(cfg, tmp_path / "crashed", crash_round=2)
    random.seed(12345)  # a restarted process starts from arbitrary generator states
    np.random.seed(54321)
    resumed = _coordinate(cfg, tmp_path / "crashed", resume=True)
    # Assert
    straight, again = _final(tmp_path / "straight"), _final(tmp_path / "crashed")
    assert straight.keys() == again.keys()
    for name in straight:
        np.testing.assert_array_equal(again[name], straight[name], err_msg=name)
    assert [r["round"] for r in resumed.results["rounds"]] == [1, 2, 3]
    assert resumed.results["run_id"] == "run-crashed"
    sampled = [sorted(r["sites"]) for r in resumed.results["rounds"]]
    assert sampled == [sorted(r.sites) for r in _coordinate(cfg, tmp_path / "again").state.history]


def test_checkpoint_restores_strategy_state_and_generators(tmp_path: Path) -> None:
    # Prepare
    cfg = tiny_config("privacy=none", "secagg=off", "strategy=fedadam", "federation.rounds=1")
    result = _coordinate(cfg, tmp_path)
    saved_python, saved_numpy = random.getstate(), np.random.get_state()[1].copy()
    fresh = build_strategy(cfg, num_sites=cfg.federation.num_sites)
    random.seed(1)
    np.random.seed(1)
    # Execute
    checkpoint = load_checkpoint(tmp_path, cfg=cfg, strategy=fresh)
    # Assert
    assert checkpoint is not None and checkpoint.state.completed_round == 1
    assert set(fresh.m_t) == set(fresh.v_t) == set(checkpoint.state.arrays)  # type: ignore[attr-defined]
    assert random.getstate() == saved_python
    np.testing.assert_array_equal(np.random.get_state()[1], saved_numpy)
    for name, array in result.state.arrays.items():
        np.testing.assert_array_equal(checkpoint.state.arrays[name].numpy(), array.numpy())


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    # Prepare
    cfg = tiny_config("privacy=none", "secagg=off", "federation.rounds=1")
    _coordinate(cfg, tmp_path)
    changed = tiny_config("privacy=none", "secagg=off", "federation.rounds=3", "federation.lr=0.5")
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"`federation.lr`: 0.05 -> 0.5"):
        load_checkpoint(tmp_path, cfg=changed, strategy=build_strategy(changed, num_sites=4))


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    cfg = tiny_config("privacy=none", "secagg=off")
    assert load_checkpoint(tmp_path, cfg=cfg, strategy=build_strategy(cfg, num_sites=4)) is None
    assert not checkpoint_path(tmp_path).exists()


def test_a_foreign_file_is_not_taken_for_a_checkpoint(tmp_path: Path) -> None:
    # Prepare
    from safetensors.numpy import save_file

    cfg = tiny_config("privacy=none", "secagg=off")
    checkpoint_path(tmp_path).parent.mkdir(parents=True)
    save_file({"x": np.zeros(3, dtype=np.float32)}, str(checkpoint_path(tmp_path)))
    # Execute / Assert
    with pytest.raises(ConfigError, match="not a fedinfer checkpoint"):
        load_checkpoint(tmp_path, cfg=cfg, strategy=build_strategy(cfg, num_sites=4))
