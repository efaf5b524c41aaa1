"""`fedinfer deploy local` as a user runs it: bad options are refused before anything is made."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedinfer.cli import main as cli_main
from fedinfer.deploy.local import LocalDeployment, demo_line

BAD = [
    (["--rounds", "0"], "`--rounds` must be >= 1 (got 0)"),
    (["--rounds", "-2"], "`--rounds` must be >= 1 (got -2)"),
    (["--sites", "1"], "`--sites` must be >= 2 (got 1)"),
    (["--port", "70000"], "`--port` must be 0 (a free port) or 1-65535 (got 70000)"),
    (["privacy.noise_multiplier=-1"], "privacy.noise_multiplier"),
    (["federation.local_epochs=0"], "`federation.local_epochs` must be > 0"),
    (["privacy.reproducible_noise=true"], "privacy.reproducible_noise"),
]


@pytest.mark.parametrize(
    ("args", "message"),
    BAD,
    ids=["rounds-0", "rounds-negative", "one-site", "port", "noise", "epochs", "replayable-noise"],
)
def test_bad_options_are_refused_before_pki_keys_or_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    # Prepare
    workdir = tmp_path / "deploy"
    # Execute
    code = cli_main(["deploy", "local", "--workdir", str(workdir), *args])
    err = capsys.readouterr().err
    # Assert: one line naming the option, exit 2, and nothing written
    assert code == 2, err
    assert err.startswith("fedinfer deploy: error: ") and message in err.splitlines()[0]
    assert "Traceback" not in err
    assert not workdir.exists(), sorted(str(p) for p in workdir.rglob("*"))


def test_every_bad_option_is_named_at_once(tmp_path: Path, capsys) -> None:
    workdir = tmp_path / "deploy"
    code = cli_main(
        ["deploy", "local", "--workdir", str(workdir), "--sites", "1", "--rounds", "0"]
    )
    first = capsys.readouterr().err.splitlines()[0]
    assert code == 2 and "`--sites`" in first and "`--rounds`" in first
    assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_refused(tmp_path: Path, capsys) -> None:
    workdir = tmp_path / "deploy"
    workdir.write_text("not a directory")
    assert cli_main(["deploy", "local", "--workdir", str(workdir)]) == 2
    assert "`--workdir`" in capsys.readouterr().err
    assert workdir.read_text() == "not a directory"


def test_demo_predictions_stand_next_to_the_true_labels() -> None:
    line = demo_line(
        {
            "site": "site-01",
            "url": "http://127.0.0.1:9",
            "model_name": "logreg",
            "model_version": "1",
            "labels": [2, 0, 1],
            "outputs": [{"shape": [3, 3], "data": [0, 0, 1, 1, 0, 0, 0, 0, 1]}],
        }
    )
    assert line == (
        "site-01: http://127.0.0.1:9 model logreg v1 predicts [2, 0, 2], "
        "true labels [2, 0, 1] (2 of 3 right)"
    )


def test_two_sites_below_the_secure_aggregation_floor_are_refused(tmp_path: Path, capsys) -> None:
    """Every site would refuse every round: a federation that publishes no model."""
    workdir = tmp_path / "deploy"
    code = cli_main(["deploy", "local", "--workdir", str(workdir), "--sites", "2"])
    first = capsys.readouterr().err.splitlines()[0]
    assert code == 2 and "`site_policy.secagg_min_participants`=3" in first and "--sites 3" in first
    assert not workdir.exists()


def test_true_labels_are_the_site_files_first_labels(tmp_path: Path) -> None:
    overrides = ["model=logreg", "dataset.num_samples=600", "secagg=off"]
    deployment = LocalDeployment(tmp_path / "d", num_sites=2, rounds=1, overrides=overrides)
    deployment.prepare()
    with np.load(tmp_path / "d" / "data" / "site-01.npz") as data:
        expected = data["y"][:4].tolist()
    assert deployment.true_labels("site-01", 4) == expected
    assert deployment.true_labels("site-09", 4) is None  # no such file: the demo line has none


def test_a_bad_data_layout_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "deploy"
    code = cli_main(["deploy", "local", "--workdir", str(workdir), "--data-layout", "tiff"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and "`--data-layout` 'tiff' is not one of npz, folder, png, shards" in err[0]
    assert not workdir.exists()


def test_demo_line_of_a_regression_site_shows_values_and_true_targets() -> None:
    line = demo_line(
        {
            "site": "site-00",
            "url": "http://127.0.0.1:9",
            "model_name": "mlp",
            "model_version": "1",
            "labels": [151.0, 75.5],
            "outputs": [{"name": "values", "shape": [2, 1], "data": [140.04, 90.0]}],
        }
    )
    assert line == (
        "site-00: http://127.0.0.1:9 model mlp v1 predicts values [140.0, 90.0], "
        "true values [151.0, 75.5]"
    )


@pytest.mark.slow
def test_a_regression_federation_deploys_and_every_site_serves_values(tmp_path: Path) -> None:
    """task=regression end to end over real processes: train under DP + secagg, publish, serve."""
    import json
    import subprocess
    import sys

    from sklearn.datasets import load_diabetes

    csv = tmp_path / "diabetes.csv"
    load_diabetes(as_frame=True).frame.rename(columns={"target": "label"}).to_csv(csv, index=False)
    done = subprocess.run(
        [sys.executable, "-m", "fedinfer", "deploy", "local", "--workdir", str(tmp_path / "d"),
         "--sites", "3", "--rounds", "1", "task=regression", "dataset=csv",
         f"dataset.path={csv}", "model=mlp"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    served = [line for line in done.stdout.splitlines() if "predicts values" in line]
    assert len(served) == 3 and all("true values" in line for line in served)
    results = json.loads((tmp_path / "d" / "coordinator" / "output" / "results.json").read_text())
    assert results["task"]["kind"] == "regression"


def test_every_site_trusts_exactly_the_deployments_identity_keys(tmp_path: Path) -> None:
    """`deploy local` makes each site's identity key (sealed with its state key) and lists all
    of them as every site's trusted secure-aggregation peers, so the default run checks them."""
    from fedinfer.crypto.at_rest import is_sealed
    from fedinfer.policy import load_peers, load_policy, trusted_identities
    from fedinfer.secagg.store import RunStateStore

    # Execute
    overrides = ["model=logreg", "dataset.num_samples=600"]
    deployment = LocalDeployment(tmp_path / "d", num_sites=3, rounds=1, overrides=overrides)
    deployment.prepare()
    # Assert: made by prepare(), sealed, and listed in every site's peers file
    for name in deployment.names:
        assert is_sealed((deployment.site_dir(name) / "secagg" / "identity.key").read_bytes())
    identities = {
        name: RunStateStore(deployment.site_dir(name), key=deployment.state_key(name))
        for name in deployment.names
    }
    expected = {name: store.identity_public() for name, store in identities.items()}
    assert len(set(expected.values())) == 3
    for name in deployment.names:
        policy = load_policy(deployment.site_dir(name) / "site_policy.toml")
        assert policy.secagg_trusted_peers is not None
        assert load_peers(Path(policy.secagg_trusted_peers)) == expected
        assert trusted_identities(policy) == set(expected.values())
