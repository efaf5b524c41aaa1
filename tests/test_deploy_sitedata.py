"""``fedinfer site --data``: files, lazily read directories and data functions, in a deployment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedinfer.config import DatasetConfig
from fedinfer.data import load_dataset
from fedinfer.data.function import DATA_ALLOW_ENV
from fedinfer.data.writers import write_folder
from fedinfer.deploy.local import LocalDeployment
from fedinfer.deploy.site import SiteOptions, node_config_toml
from fedinfer.deploy.sitedata import data_spec, inspect_site_data
from fedinfer.errors import ConfigError, DataError
from fedinfer.fl.run_config import NodeConfigKeys
from fedinfer.models.custom import ALLOW_ENV

DATA_FN = "examples.images.data.load_site"
CNN = "examples.images.net.DigitsCnn"


def test_a_data_directory_is_inspected_lazily(tmp_path: Path) -> None:
    digits = load_dataset(DatasetConfig(name="digits"), seed=0).subset(np.arange(100))
    root = write_folder(digits, tmp_path / "d", sample_shape=(1, 8, 8), suffix=".png")
    info = inspect_site_data(root, site_id="site-00")
    assert (info.num_samples, info.sample_shape, info.num_classes, info.lazy) == (
        100, (1, 8, 8), 10, True,
    )  # fmt: skip
    assert "100 samples of shape [1, 8, 8], 10 classes (read lazily)" in info.describe()


def test_a_data_function_is_passed_to_the_client_app_verbatim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ALLOW_ENV, "examples.images.*")
    opts = SiteOptions(
        name="site-01", data=f"py:{DATA_FN}", state_dir=tmp_path, coordinator="h:1",
        ca_cert=tmp_path, node_key=tmp_path, coordinator_public_key=tmp_path / "c.pub",
    )  # fmt: skip
    assert f'"{NodeConfigKeys.DATA_PATH}" = "py:{DATA_FN}"' in node_config_toml(opts)
    info = inspect_site_data(opts.data, site_id="site-01")
    assert info.lazy and info.sample_shape == (1, 8, 8) and info.num_samples == 449


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "e" / "3").mkdir(parents=True) or p / "e", "holds no .png or .npy"),
        (lambda p: "py:", "names no function"),
        (lambda p: "py:examples.images.data.load_site", "not on this site's allow-list"),
        (lambda p: (p / "e" / "0").rename(p / "e" / "cat") and p / "e", "by their integer id"),
    ],
    ids=["missing-dir", "empty-class-folder", "no-function", "function-not-allowed", "names"],
)
def test_fedinfer_site_refuses_bad_data_in_one_line_before_connecting(
    tmp_path: Path, make: object, message: str
) -> None:
    """The real CLI: exit 2 and one line naming the problem; nothing is started."""
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "0").mkdir()
    np.save(tmp_path / "e" / "0" / "a.npy", np.zeros(4, np.float32))
    data = make(tmp_path)  # type: ignore[operator]
    for name in ("ca.pem", "node.key", "coordinator.pub"):
        (tmp_path / name).write_text("x")
    os.chmod(tmp_path / "node.key", 0o600)
    env = {k: v for k, v in os.environ.items() if k != DATA_ALLOW_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "fedinfer", "site", "--name", "site-00", "--data", str(data),
         "--state-dir", str(tmp_path / "state"), "--coordinator", "127.0.0.1:1",
         "--ca", str(tmp_path / "ca.pem"), "--key", str(tmp_path / "node.key"),
         "--coordinator-public-key", str(tmp_path / "coordinator.pub"), "--no-serve"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    error, hint = proc.stderr.strip().splitlines()  # one error line, then "Try ... --help"
    assert error.startswith("fedinfer site: error:") and message in error, proc.stderr
    assert hint.startswith("Try")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "state" / "node-config.toml").exists()


def test_data_spec_keeps_functions_and_resolves_paths(tmp_path: Path) -> None:
    assert data_spec(f"py:{DATA_FN}") == f"py:{DATA_FN}"
    assert data_spec(Path("rel")) == str(Path("rel").resolve())
    with pytest.raises(ConfigError, match="names no function"):
        data_spec("py:not a target")
    with pytest.raises(DataError, match="is not a directory"):
        from fedinfer.data import open_folder

        open_folder(tmp_path / "nope")


# A real deployment: a custom CNN, one site on PNG class folders, one on a data function ------

OVERRIDES = [
    "dataset=digits",
    "model=custom",
    f"model._target_={CNN}",
    "+model.kwargs.channels=8",
    "privacy=dpsgd",
    "privacy.fix_model=true",
    "secagg=on",
    "site_policy.secagg_min_participants=2",
    "partition=iid",
    "federation.local_epochs=1",
    "federation.batch_size=64",
    "federation.round_timeout_s=300",
]


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalDeployment, list[str]]]:
    workdir = tmp_path_factory.mktemp("deploy") / "custom-lazy"
    saved = {k: os.environ.get(k) for k in (ALLOW_ENV, DATA_ALLOW_ENV, "PYTHONPATH")}
    # The coordinator's ServerApp and the site workers import examples.images: the user's
    # package must be on their path (PYTHONPATH, or installed), as docs/deployment.md says.
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, saved["PYTHONPATH"]]))
    os.environ[ALLOW_ENV] = ""  # prepare() allows the run's own model, as deploy local does
    os.environ[DATA_ALLOW_ENV] = DATA_FN  # site-01's operator allows its data function
    dep = LocalDeployment(
        workdir, num_sites=2, rounds=1, overrides=OVERRIDES, data_layout="png"
    )
    try:
        overrides = dep.prepare()
        dep.start_coordinator(overrides)
        dep.start_site("site-00")  # PNG class folders, read lazily
        dep.start_site("site-01", extra=["--data", f"py:{DATA_FN}"])
        assert dep.coordinator is not None and dep.coordinator.process is not None
        code = dep.coordinator.process.wait(timeout=600)
        assert code == 0, dep.coordinator.log_file.read_text()[-3000:]
        yield dep, overrides
    finally:
        dep.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_custom_model_trains_on_lazy_site_data_and_every_site_serves_it(
    deployment: tuple[LocalDeployment, list[str]],
) -> None:
    dep, overrides = deployment
    # The coordinator was told the model's target and shapes, and nothing about any data.
    told = [o for o in overrides if o.startswith(("deployment.", "model.input_shape"))]
    assert sorted(told) == sorted([
        "deployment.input_dim=64", "deployment.num_classes=10", "model.input_shape=[1,8,8]",
        "deployment.connect_timeout_s=300",
    ])  # fmt: skip
    assert not any(o.startswith("dataset.path") for o in overrides)
    results = dep.results()
    version = int(results["model_version"])
    assert results["model"]["dp_fixes"], "BatchNorm was replaced for DP-SGD"
    for name in dep.names:
        answer = dep.ask_site(name, expect_version=version)
        assert answer["outputs"][0]["shape"][0] == 4
    logs = {name: (dep.workdir / "logs" / f"{name}.log").read_text() for name in dep.names}
    assert "(read lazily)" in logs["site-00"] and "[1, 8, 8]" in logs["site-00"]
    assert f"py:{DATA_FN}" in logs["site-01"]
    manifest = json.loads((dep.coordinator_dir / "output" / "model" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [-1, 1, 8, 8]


def test_a_regression_shard_directory_is_inspected_as_targets_not_refused(tmp_path: Path) -> None:
    """The site learns the task only from the coordinator: float targets must not stop it."""
    import numpy as np

    from fedinfer.deploy.sitedata import inspect_site_data

    rng = np.random.default_rng(0)
    for i in range(2):
        np.savez(
            tmp_path / f"shard-{i}.npz",
            x=rng.random((20, 5), dtype=np.float32),
            y=(rng.random(20) * 100).astype(np.float32),
        )
    info = inspect_site_data(tmp_path, site_id="site-00")
    assert info.targets and info.num_samples == 40 and info.num_classes == 1
    assert "1 target column(s)" in info.describe()
