from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from fedinfer.config import load_config, validate_config
from fedinfer.errors import ConfigError
from fedinfer.fl.run_config import from_run_config, to_run_config
from fedinfer.policy import SitePolicy


def test_default_config_is_the_main_job() -> None:
    cfg = load_config([])
    assert cfg.dataset.name == "mnist1d"
    assert cfg.model.name == "cnn1d"
    assert cfg.privacy.mode == "dpsgd"
    assert cfg.secagg.enabled is True
    assert cfg.serving.enabled is True
    validate_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["federation.num_sites=0"], "federation.num_sites"),
        (["partition.alpha=0"], "partition.alpha"),
        (["partition.alpha=-1"], "partition.alpha"),
        (["federation.fraction_train=1.5"], "federation.fraction_train"),
        (["strategy=krum"], "strategy.name"),  # krum + secagg=on is refused
        (["privacy.max_grad_norm=0"], "privacy.max_grad_norm"),
        (
            ["privacy.noise_multiplier=null", "privacy.target_epsilon=null"],
            "privacy.noise_multiplier",
        ),  # neither set
        (["secagg.bits=40"], "secagg.bits"),
        (["privacy=central"], "privacy.mode"),  # central DP + secagg is refused
        (["dataset=csv"], "dataset.path"),
        (["serving.workers=0"], "serving.workers"),
    ],
    ids=[
        "no-sites",
        "alpha-zero",
        "alpha-negative",
        "fraction",
        "robust+secagg",
        "clip-norm",
        "no-noise-no-target",
        "bits",
        "central+secagg",
        "csv-without-path",
        "serve-workers",
    ],
)
def test_bad_config_names_the_key(overrides: list[str], key: str) -> None:
    cfg = (
        load_config(overrides)
        if overrides[0] != "dataset=csv"
        else load_config(["dataset=csv", "dataset.path=null"])
    )
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


@pytest.mark.parametrize(
    ("override", "new_key"),
    [
        ("secagg.site_min_threshold_fraction=0.3", "site_policy.secagg_min_threshold"),
        ("+secagg.site_min_participants=2", "site_policy.secagg_min_participants"),
    ],
    ids=["threshold", "participants"],
)
def test_a_site_floor_in_the_run_config_names_the_site_policy_key(
    override: str, new_key: str
) -> None:
    """The coordinator's run config no longer carries a site's floors: the error says where."""
    with pytest.raises(ConfigError, match=new_key.replace(".", r"\.")):
        load_config([override])


def test_every_problem_is_reported_at_once() -> None:
    cfg = load_config(["federation.num_sites=0", "federation.rounds=0"])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert "federation.num_sites" in str(info.value) and "federation.rounds" in str(info.value)


def test_robust_strategy_allowed_without_secagg() -> None:
    validate_config(load_config(["strategy=krum", "secagg=off"]))


def test_unknown_group_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="`dataset=foo` is not a dataset option"):
        load_config(["dataset=foo"])


def test_run_config_round_trip() -> None:
    cfg = load_config(["model=mlp", "model.hidden_sizes=[32,16]", "strategy=fedprox"])
    flat = to_run_config(cfg)
    assert all("_" not in k.split(".")[-1] for k in flat), "keys are kebab-case"
    # The site policy is the sites' own: never in the run config, so it comes back as the default.
    assert from_run_config(flat) == dataclasses.replace(cfg, site_policy=SitePolicy())


def test_cli_reports_bad_config_without_traceback(tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedinfer",
            "simulate",
            "federation.num_sites=0",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "federation.num_sites" in proc.stderr
    assert "Traceback" not in proc.stderr
