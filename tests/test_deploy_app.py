"""The Flower app a coordinator runs: bundle, entry points, run config, node config, site checks."""

from __future__ import annotations

import dataclasses
import io
import stat
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import flatten_dict, parse_config_args, validate_config

from fedinfer.deploy.apps import config_of, model_shape
from fedinfer.deploy.bundle import (
    CLIENT_ENTRY,
    COMPONENTS,
    PUBLISHER,
    SERVER_ENTRY,
    write_app_bundle,
)
from fedinfer.deploy.site import SiteOptions, _check, node_config_toml
from fedinfer.errors import ConfigError
from fedinfer.fl.run_config import NodeConfigKeys
from fedinfer.policy import SitePolicy
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)


def test_bundle_carries_the_exact_config_to_every_site(tmp_path: Path) -> None:
    # Prepare
    cfg = tiny_config(
        "deployment.input_dim=40",
        "deployment.num_classes=10",
        "privacy.delta=1e-5",
        "model=mlp",
        "model.hidden_sizes=[16,8]",
    )
    # Execute
    app = write_app_bundle(tmp_path / "app", cfg)
    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    run_config = flatten_dict(
        pyproject["tool"]["flwr"]["app"]["config"]
    )  # what Flower hands the apps
    # Assert
    assert validate_config(pyproject, check_module=False)[0]
    # Everything but the site policy, which is the sites' own and never in the bundle.
    assert config_of(_context(run_config)) == dataclasses.replace(cfg, site_policy=SitePolicy())
    assert not [k for k in run_config if k.startswith("site_policy")]
    assert model_shape(cfg).input_dim == 40


# Flower's FAB builder uses a pathspec pattern class that pathspec deprecates (upstream, harmless).
@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")
def test_bundle_builds_into_a_fab_with_only_the_entry_points(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    app = write_app_bundle(
        tmp_path / "app", tiny_config("deployment.input_dim=40", "deployment.num_classes=10")
    )
    names = sorted(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist())
    assert names == [".info/CONTENT", "clients/app.py", "pyproject.toml", "server/app.py"]


def test_repository_entry_points_and_app_metadata_match_the_bundle() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert (REPO / "server" / "app.py").read_text() == SERVER_ENTRY
    assert (REPO / "clients" / "app.py").read_text() == CLIENT_ENTRY
    assert pyproject["tool"]["flwr"]["app"]["components"] == COMPONENTS
    assert pyproject["tool"]["flwr"]["app"]["publisher"] == PUBLISHER
    assert pyproject["project"]["name"] == "fedinfer"  # the existing [project] is untouched


def test_a_run_without_fedinfer_config_is_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError, match="fedinfer coordinator"):
        config_of(_context({"num-server-rounds": 3}))


def test_model_shape_names_the_missing_keys() -> None:
    with pytest.raises(ConfigError, match=r"`deployment.input_dim`, `deployment.num_classes`"):
        model_shape(tiny_config())


def _site(tmp_path: Path, **overrides: object) -> SiteOptions:
    for name in ("data.npz", "ca.crt", "node.key", "coordinator.pub"):
        (tmp_path / name).touch()
    (tmp_path / "node.key").chmod(0o600)
    options = SiteOptions(
        name="a b",
        data=tmp_path / "data.npz",
        state_dir=tmp_path / "state",
        coordinator="127.0.0.1:9092",
        ca_cert=tmp_path / "ca.crt",
        node_key=tmp_path / "node.key",
        coordinator_public_key=tmp_path / "coordinator.pub",
        serve=False,
    )
    for key, value in overrides.items():
        setattr(options, key, value)
    return options


def test_node_config_file_is_what_the_supernode_parses(tmp_path: Path) -> None:
    # Prepare: a path with a space and a quote, which a command-line node config would mangle
    options = _site(tmp_path, data=tmp_path / 'my "site" data.npz')
    path = tmp_path / "node-config.toml"
    path.write_text(node_config_toml(options))
    # Execute
    parsed = parse_config_args([str(path)])  # what flower-supernode --node-config FILE does
    # Assert
    assert parsed[NodeConfigKeys.SITE_NAME] == "a b"
    assert parsed[NodeConfigKeys.DATA_PATH] == str((tmp_path / 'my "site" data.npz').resolve())
    assert parsed[NodeConfigKeys.STATE_DIR] == str((tmp_path / "state").resolve())


def test_site_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    options = _site(tmp_path)
    options.node_key.chmod(0o644)
    assert stat.S_IMODE(options.node_key.stat().st_mode) == 0o644
    with pytest.raises(ConfigError, match="chmod 600"):
        _check(options)


def test_site_reports_every_missing_file_at_once(tmp_path: Path) -> None:
    options = _site(
        tmp_path, data=tmp_path / "nope.npz", ca_cert=tmp_path / "nope.crt", coordinator="host-only"
    )
    with pytest.raises(ConfigError) as info:
        _check(options)
    assert (
        "--data" in str(info.value) and "--ca" in str(info.value) and "HOST:PORT" in str(info.value)
    )
