"""The shipped examples, run small: real Flower federation, real server process, real client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.usefixtures("example_sandbox")
def test_images_example_trains_with_dp_secagg_serves_and_predicts(tmp_path: Path) -> None:
    from examples.images.run import main

    out = tmp_path / "run"
    summary = main(["--runtime", "inprocess", "--sites", "3", "--rounds", "2", "--out", str(out)])
    assert summary["dp_fixes"] == [
        "net.features.1: BatchNorm2d -> GroupNorm",
        "net.features.5: BatchNorm2d -> GroupNorm",
    ]
    assert summary["served_input_shape"] == [-1, 1, 8, 8]
    assert 0 < summary["max_epsilon"] <= 8.0 + 1e-6  # type: ignore[operator]
    assert summary["served_accuracy"] > 0.5, "well above chance (0.1)"  # type: ignore[operator]
    assert summary["predict_rows"] == 200 and summary["predict_agrees_with_server"]
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["secagg"]["enabled"] and config["privacy"]["mode"] == "dpsgd"
    assert config["model"]["input_shape"] == [1, 8, 8]  # from the data layer
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert manifest["model"]["_target_"] == "examples.images.net.DigitsCnn"
    assert manifest["model"]["num_parameters"] == summary["num_parameters"]

@pytest.mark.usefixtures("example_sandbox")
def test_regression_example_federates_with_dp_secagg_against_a_centralized_baseline(
    tmp_path: Path,
) -> None:
    from examples.regression.run import main

    out = tmp_path / "run"
    summary = main(["--runtime", "inprocess", "--sites", "3", "--rounds", "3", "--out", str(out)])
    std = summary["predict_mean_rmse"]
    assert 0 < summary["max_epsilon"] <= 8.0 + 1e-6  # type: ignore[operator]
    assert summary["least_squares_rmse"] < std  # type: ignore[operator]
    assert 0 < summary["federated_dp_rmse"] < 2 * std  # type: ignore[operator]
    # fedinfer predict (ONNX graph, no model code) reproduces the coordinator's evaluation
    assert summary["predict_rmse"] == pytest.approx(summary["federated_dp_rmse"], rel=1e-4)
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["kind"] == "regression" and results["final_accuracy"] is None
    assert set(results["final_metrics"]) == {"rmse", "mae", "r2"}
    config = results["config"]
    assert config["secagg"]["enabled"] and config["privacy"]["mode"] == "dpsgd"
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["task"]["kind"] == "regression"
    assert manifest["outputs"][0]["shape"] == [-1, 1]
