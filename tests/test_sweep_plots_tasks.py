"""Sweep plots for a task without accuracy (issue 13): a regression sweep plots its RMSE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedinfer.reporting.sweep import JobResult
from fedinfer.reporting.sweep_plots import plot_accuracy_by_round


def _job(name: str, rounds: list[dict[str, Any]]) -> JobResult:
    return JobResult(job=name, overrides={"seed": name}, status="completed", rounds=rounds)


def _regression_rounds(rmse: list[float]) -> list[dict[str, Any]]:
    return [
        {"round": i + 1, "accuracy": None, "metrics": {"rmse": v, "mae": v / 2, "r2": 1 - v}}
        for i, v in enumerate(rmse)
    ]


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every figure the plot function saves, as matplotlib holds it (lines, labels)."""
    from matplotlib.figure import Figure

    figures: list[Any] = []
    save = Figure.savefig

    def spy(fig: Figure, *args: Any, **kwargs: Any) -> None:
        figures.append(fig)
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return figures


def test_a_regression_sweep_plots_its_rmse_by_round(tmp_path: Path, drawn: list[Any]) -> None:
    # Prepare: two regression jobs, no accuracy in any round
    jobs = [
        _job("0", _regression_rounds([0.9, 0.7, 0.6])),
        _job("1", _regression_rounds([1.1, 0.8])),
    ]
    # Execute
    path = plot_accuracy_by_round(jobs, {"0": "seed=0", "1": "seed=1"}, tmp_path / "p.png")
    # Assert: a PNG whose plotted lines are the RMSE of each round, labelled as such
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = drawn[0].axes
    lines = {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()}
    assert lines == {
        "seed=0": [[1, 0.9], [2, 0.7], [3, 0.6]],
        "seed=1": [[1, 1.1], [2, 0.8]],
    }
    assert "rmse" in ax.get_ylabel() and "RMSE" in ax.get_title()
    assert ax.get_ylim()[1] > 1.1, "not clipped to accuracy's [0, 1]"


def test_a_classification_sweep_still_plots_accuracy(tmp_path: Path, drawn: list[Any]) -> None:
    rounds = [{"round": 1, "accuracy": 0.5, "metrics": {"accuracy": 0.5, "f1": 0.4}},
              {"round": 2, "accuracy": 0.75, "metrics": {"accuracy": 0.75, "f1": 0.7}}]  # fmt: skip
    path = plot_accuracy_by_round([_job("0", rounds)], {"0": "a"}, tmp_path / "p.png")
    assert path is not None
    (ax,) = drawn[0].axes
    assert [line.get_xydata().tolist() for line in ax.get_lines()] == [[[1, 0.5], [2, 0.75]]]
    assert ax.get_ylabel() == "global accuracy" and ax.get_ylim() == (0, 1)


def test_nothing_evaluated_draws_nothing(tmp_path: Path) -> None:
    job = _job("0", [{"round": 1, "accuracy": None, "metrics": {}}])
    assert plot_accuracy_by_round([job], {"0": "a"}, tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()


def _dp_rounds(rmse: list[float], eps: list[float]) -> list[dict[str, Any]]:
    rounds = _regression_rounds(rmse)
    for r, e in zip(rounds, eps, strict=True):
        r["epsilon"] = {"site-00": e}
    return rounds


def test_a_regression_sweeps_privacy_utility_plot_uses_rmse_and_a_lower_is_better_frontier(
    tmp_path: Path, drawn: list[Any]
) -> None:
    from fedinfer.reporting.sweep_plots import plot_privacy_utility

    # Prepare: two DP jobs (the cheaper one has the worse RMSE) and one without DP
    jobs = [
        JobResult("0", {}, "completed", rounds=_dp_rounds([0.9, 0.8], [1.0, 2.0])),
        JobResult("1", {}, "completed", rounds=_dp_rounds([0.7, 0.5], [2.0, 4.0])),
        JobResult("2", {}, "completed", rounds=_regression_rounds([0.4, 0.3])),
    ]
    # Execute
    path = plot_privacy_utility(jobs, {"0": "a", "1": "b", "2": "c"}, tmp_path / "pu.png")
    # Assert: end points are each job's last RMSE; the frontier improves downwards
    assert path is not None
    (ax,) = drawn[0].axes
    lines = {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()}
    assert lines["frontier"] == [[2.0, 0.8], [4.0, 0.5], [4.0, 0.5]]
    assert lines["no DP: c"][0][1] == 0.3
    assert "rmse" in ax.get_ylabel() and ax.get_ylim()[1] >= 0.9


def test_a_regression_sweeps_seed_spread_plots_rmse(tmp_path: Path, drawn: list[Any]) -> None:
    from fedinfer.reporting.sweep_plots import plot_seed_spread

    jobs = [_job("0", _regression_rounds([1.0, 0.6])), _job("1", _regression_rounds([2.0, 1.0]))]
    path = plot_seed_spread(jobs, ["seed"], tmp_path / "s.png")
    assert path is not None
    ax_round, ax_final = drawn[0].axes
    (mean,) = [line for line in ax_round.get_lines()]
    assert mean.get_xydata().tolist() == [[1, 1.5], [2, 0.8]]
    assert "rmse" in ax_round.get_ylabel() and "rmse" in ax_final.get_ylabel()
