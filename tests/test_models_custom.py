"""model=custom: a user's torch.nn.Module by `_target_`, without Ray.

The allow-list tests are attacks: a coordinator's config or a signed manifest naming a
module must not make a site import it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from fedinfer.artifacts import (
    ModelStore,
    generate_signing_key,
    load_public_key,
    load_torch_model,
    read_weights,
    save_public_key,
    verify_artifact,
    weights_from_module,
    write_artifact,
)
from fedinfer.config.schema import ModelConfig, PrivacyConfig
from fedinfer.errors import ConfigError, ModelIntegrityError, ServingError
from fedinfer.fl.run_config import from_run_config, to_run_config
from fedinfer.models import build_model, describe_model
from fedinfer.models.custom import ALLOW_ENV, ShapedModel
from fedinfer.serving.backends import export_onnx
from fedinfer.serving.server import ServeOptions
from tests.conftest import tiny_config
from tests.serving_harness import running_server

TARGET = "examples.images.net.DigitsCnn"
SHAPE = [1, 8, 8]


def _cfg(**changes: object) -> ModelConfig:
    fields: dict[str, object] = {
        "name": "custom",
        "_target_": TARGET,
        "kwargs": {"channels": 4},
        "input_shape": SHAPE,
    }
    fields.update(changes)
    return ModelConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture
def allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_ENV, "examples.images.*")


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module whose import leaves a mark: the attacker's payload."""
    mark = tmp_path / "imported"
    (tmp_path / "evil_site_pkg.py").write_text(
        "import pathlib, torch\n"
        f"pathlib.Path({str(mark)!r}).write_text('pwned')\n"
        "class Net(torch.nn.Linear):\n"
        "    def __init__(self):\n"
        "        super().__init__(64, 10)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evil_site_pkg", raising=False)
    return mark


def test_custom_module_takes_kwargs_shape_and_classes(allowed: None) -> None:
    model = build_model(_cfg(), input_dim=64, num_classes=10)
    assert isinstance(model, ShapedModel) and model.input_shape == (1, 8, 8)
    assert model.net.head.out_features == 10 and model.net.features[0].out_channels == 4
    x = torch.randn(5, 64)
    model.eval()
    torch.testing.assert_close(model(x), model(x.reshape(5, 1, 8, 8)))


def test_input_shape_must_fit_the_data(allowed: None) -> None:
    with pytest.raises(ConfigError, match=r"model.input_shape.*product must be 40"):
        build_model(_cfg(), input_dim=40, num_classes=10)


def test_site_refuses_a_target_not_on_its_allow_list(
    evil_module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ALLOW_ENV, "examples.images.*")
    cfg = _cfg(_target_="evil_site_pkg.Net", kwargs={}, input_shape=None)
    with pytest.raises(ConfigError, match=rf"not on this site's allow-list.*{ALLOW_ENV}"):
        build_model(cfg, input_dim=64, num_classes=10)
    assert not evil_module.exists(), "the module was imported although it is not allowed"
    monkeypatch.delenv(ALLOW_ENV)
    with pytest.raises(ConfigError, match="allow-list"):
        build_model(cfg, input_dim=64, num_classes=10)
    assert not evil_module.exists()
    # A prefix entry is a module prefix, not a string prefix: "evil_site" does not allow it.
    monkeypatch.setenv(ALLOW_ENV, "evil_site.*")
    with pytest.raises(ConfigError, match="allow-list"):
        build_model(cfg, input_dim=64, num_classes=10)
    assert not evil_module.exists()
    monkeypatch.setenv(ALLOW_ENV, "evil_site_pkg.Net")  # the operator allows it: it loads
    assert isinstance(build_model(cfg, input_dim=64, num_classes=10), ShapedModel)
    assert evil_module.exists()


def test_nested_targets_in_kwargs_are_refused(allowed: None) -> None:
    cfg = _cfg(kwargs={"channels": {"_target_": "os.system", "command": "true"}})
    with pytest.raises(ConfigError, match=r"model.kwargs.channels.*nested `_target_`"):
        build_model(cfg, input_dim=64, num_classes=10)


def test_a_signed_manifest_naming_a_module_does_not_make_a_site_import_it(
    evil_module: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ALLOW_ENV, "evil_site_pkg.Net")  # the publishing side allowed it
    cfg = _cfg(_target_="evil_site_pkg.Net", kwargs={}, input_shape=None)
    weights = weights_from_module(build_model(cfg, input_dim=64, num_classes=10))
    evil_module.unlink()
    monkeypatch.delitem(sys.modules, "evil_site_pkg")
    key = generate_signing_key()
    out = write_artifact(
        tmp_path / "v1",
        weights=weights,
        model_cfg=cfg,
        input_dim=64,
        num_classes=10,
        version=1,
        server_round=1,
        metrics={},
        privacy={},
        run_id="r",
        signing_key=key,
    )
    evil_module.unlink()
    monkeypatch.delitem(sys.modules, "evil_site_pkg")
    monkeypatch.setenv(ALLOW_ENV, "examples.images.*")  # the serving site's own allow-list
    manifest = verify_artifact(out, public_key=key.public_key())
    with pytest.raises(ModelIntegrityError, match="allow-list"):
        load_torch_model(read_weights(out, manifest), manifest)
    assert not evil_module.exists()


def test_batchnorm_under_dp_names_the_layer_and_the_key(allowed: None) -> None:
    with pytest.raises(ConfigError, match=r"layer net\.features\.1 \(BatchNorm2d\).*fix_model"):
        build_model(_cfg(), input_dim=64, num_classes=10, privacy=PrivacyConfig(mode="dpsgd"))
    # Without DP the user's BatchNorm stays.
    plain = build_model(_cfg(), input_dim=64, num_classes=10, privacy=PrivacyConfig())
    assert isinstance(plain.net.features[1], nn.BatchNorm2d)


def test_fix_model_replaces_batchnorm_and_reports_it(allowed: None) -> None:
    privacy = PrivacyConfig(mode="dpsgd", fix_model=True)
    fixed = build_model(_cfg(), input_dim=64, num_classes=10, privacy=privacy)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert isinstance(fixed.net.features[1], nn.GroupNorm)
    report = describe_model(_cfg(), input_dim=64, num_classes=10, privacy=privacy)
    assert report["dp_fixes"] == [
        "net.features.1: BatchNorm2d -> GroupNorm",
        "net.features.5: BatchNorm2d -> GroupNorm",
    ]
    assert report["target"] == TARGET and report["kwargs"] == {"channels": 4}
    assert report["num_parameters"] == sum(p.numel() for p in fixed.parameters())
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(fixed, strict=False) == []


def test_custom_keys_survive_the_flower_run_config() -> None:
    cfg = tiny_config(
        "model=custom", f"model._target_={TARGET}", "+model.kwargs.channels=4",
        "model.input_shape=[1,8,8]", "privacy.fix_model=true",
    )  # fmt: skip
    back = from_run_config(to_run_config(cfg))
    assert back.model == cfg.model and back.model.kwargs == {"channels": 4}
    assert back.privacy.fix_model is True


def _publish(tmp_path: Path, privacy: PrivacyConfig) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = build_model(_cfg(), input_dim=64, num_classes=10, privacy=privacy)
    key = generate_signing_key()
    save_public_key(key.public_key(), tmp_path / "signing.pub")
    out = write_artifact(
        tmp_path / "artifact",
        weights=weights_from_module(model),
        model_cfg=_cfg(),
        input_dim=64,
        num_classes=10,
        version=1,
        server_round=1,
        metrics={},
        privacy={},
        run_id="r",
        signing_key=key,
    )
    return out, model.eval()


@pytest.mark.parametrize("fix", [False, True])
def test_artifact_records_shape_target_and_size_and_reloads(
    allowed: None, tmp_path: Path, fix: bool
) -> None:
    privacy = PrivacyConfig(mode="dpsgd", fix_model=True) if fix else PrivacyConfig()
    out, model = _publish(tmp_path, privacy)
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert doc["model"]["_target_"] == TARGET and doc["model"]["kwargs"] == {"channels": 4}
    assert doc["model"]["num_parameters"] == sum(p.numel() for p in model.parameters())
    manifest = verify_artifact(out, public_key=load_public_key(tmp_path / "signing.pub"))
    assert manifest.input_dim == 64 and manifest.input_shape == (1, 8, 8)
    loaded = load_torch_model(read_weights(out, manifest), manifest)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))


def test_onnx_export_of_an_image_model_matches_torch(allowed: None) -> None:
    model = build_model(_cfg(), input_dim=64, num_classes=10).eval()
    import onnxruntime as ort

    for shape in ((1, 8, 8), (64,)):  # the N-d form and the flat form the server sends
        session = ort.InferenceSession(export_onnx(model, input_shape=shape))
        x = np.random.default_rng(1).standard_normal((7, *shape)).astype(np.float32)
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, atol=1e-4)


class _BatchFrozen(nn.Module):
    """Traces to a graph with the example batch size baked in (a wrong export)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, -1)[:, :10] + x.new_zeros(()).fill_(float(x.shape[0] == 2))


class _NotExportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy()[:, :10] * 2)


def test_onnx_export_refuses_a_graph_that_disagrees_with_torch() -> None:
    with pytest.raises(ServingError, match="disagrees with torch|cannot run"):
        export_onnx(_BatchFrozen(), input_shape=(64,))
    with pytest.raises(ServingError, match="ONNX"):
        export_onnx(_NotExportable(), input_shape=(64,))


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_served_image_model_shows_and_checks_its_shape(
    allowed: None, tmp_path: Path, backend: str
) -> None:
    out, model = _publish(tmp_path, PrivacyConfig())
    store = ModelStore(tmp_path / "store")
    store.publish(out, public_key=load_public_key(tmp_path / "signing.pub"))
    options = ServeOptions(
        model_store=tmp_path / "store", public_key=tmp_path / "signing.pub", backend=backend
    )
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    with running_server(options) as url:
        meta = httpx.get(f"{url}/v2/models/custom").json()
        assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
        for shape in ([3, 1, 8, 8], [3, 64]):  # the image form and the documented flat form
            body = {
                "inputs": [
                    {"name": "input", "shape": shape, "datatype": "FP32",
                     "data": x.reshape(shape).ravel().tolist()}
                ],
                "outputs": [{"name": "logits"}],
            }  # fmt: skip
            reply = httpx.post(f"{url}/v2/models/custom/infer", json=body)
            assert reply.status_code == 200, reply.text
            logits = np.asarray(reply.json()["outputs"][0]["data"], dtype=np.float32)
            np.testing.assert_allclose(logits.reshape(3, 10), expected, atol=1e-4)
        bad = {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32",
                           "data": x[0].ravel().tolist()}]}  # fmt: skip
        reply = httpx.post(f"{url}/v2/models/custom/infer", json=bad)
        assert reply.status_code == 400 and "[batch, 1, 8, 8] or [batch, 64]" in reply.text


def test_simulation_refuses_batchnorm_counters_under_secagg_before_any_site_starts(
    allowed: None, tmp_path: Path
) -> None:
    from fedinfer.simulation import run_simulation

    cfg = tiny_config(
        "dataset=digits", "model=custom", f"model._target_={TARGET}", "privacy=none",
        "secagg=on",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"num_batches_tracked.*int64.*privacy.fix_model=true"):
        run_simulation(cfg, output_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()
    cfg = tiny_config(
        "dataset=digits", "model=custom", f"model._target_={TARGET}", "privacy=dpsgd",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"net\.features\.1 \(BatchNorm2d\).*fix_model=true"):
        run_simulation(cfg, output_dir=tmp_path / "run2")


def test_config_errors_name_the_key() -> None:
    from fedinfer.config.validate import validate_config

    with pytest.raises(ConfigError, match=r"model._target_` is required for model=custom"):
        validate_config(tiny_config("model=custom"))
    with pytest.raises(ConfigError, match=r"model.input_shape` applies to model=custom only"):
        build_model(ModelConfig(name="mlp", input_shape=[64]), input_dim=64, num_classes=10)
    with pytest.raises(ConfigError, match=r"cannot be imported.*PYTHONPATH"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(ALLOW_ENV, "no_such_pkg.*")
            build_model(_cfg(_target_="no_such_pkg.Net"), input_dim=64, num_classes=10)


def test_fix_is_reported_once_per_run(
    allowed: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedinfer.models.custom import preflight

    cfg = tiny_config(
        "dataset=digits", "model=custom", f"model._target_={TARGET}",
        "model.input_shape=[1,8,8]", "privacy=dpsgd", "privacy.fix_model=true",
    )  # fmt: skip
    with caplog.at_level("INFO", logger="fedinfer.models.custom"):
        preflight(cfg, input_dim=64, num_classes=10)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "net.features.1: BatchNorm2d -> GroupNorm" in caplog.records[0].getMessage()


def test_a_site_serves_the_signed_onnx_graph_without_importing_the_code(
    evil_module: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedinfer.models.custom import export_graph
    from fedinfer.serving.backends import build_backend

    monkeypatch.setenv(ALLOW_ENV, "evil_site_pkg.Net")  # the coordinator has the code
    cfg = tiny_config(
        "model=custom", "model._target_=evil_site_pkg.Net", "privacy=none", "secagg=off"
    )
    model = build_model(cfg.model, input_dim=64, num_classes=10).eval()
    weights = weights_from_module(model)
    graph = export_graph(cfg, weights, input_dim=64, num_classes=10)
    assert graph is not None
    key = generate_signing_key()
    out = write_artifact(
        tmp_path / "v1", weights=weights, model_cfg=cfg.model, input_dim=64, num_classes=10,
        version=1, server_round=1, metrics={}, privacy={}, run_id="r", signing_key=key,
        onnx_graph=graph,
    )  # fmt: skip
    evil_module.unlink()
    monkeypatch.delitem(sys.modules, "evil_site_pkg")
    monkeypatch.delenv(ALLOW_ENV)  # the serving site allows nothing
    manifest = verify_artifact(out, public_key=key.public_key())
    stored = read_weights(out, manifest)
    backend = build_backend("onnx", stored, manifest)
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(backend.predict(x), expected, atol=1e-4)
    assert not evil_module.exists() and "evil_site_pkg" not in sys.modules
    with pytest.raises(ModelIntegrityError, match="allow-list"):  # torch needs the code
        build_backend("torch", stored, manifest)
    assert not evil_module.exists()


UNEXPORTABLE = '''
import torch


class Net(torch.nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.lin = torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)

    def forward(self, x):
        y = self.lin(x.reshape(x.shape[0], -1))
        return torch.from_numpy(y.detach().numpy() * 2)  # leaves the graph: no ONNX export
'''


def test_a_model_onnx_cannot_serve_is_refused_before_training_unless_torch_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedinfer.models.custom import preflight

    (tmp_path / "unexportable_pkg.py").write_text(UNEXPORTABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ALLOW_ENV, "unexportable_pkg.*")
    base = ("model=custom", "model._target_=unexportable_pkg.Net", "privacy=none", "secagg=off")
    with pytest.raises(
        ConfigError, match=r"cannot be served as ONNX \(.+\); .*serving.allow_torch_fallback=true"
    ):
        preflight(tiny_config(*base), input_dim=40, num_classes=10)
    # Allowed: published without a graph (sites serve it with torch), no error.
    preflight(tiny_config(*base, "serving.allow_torch_fallback=true"), input_dim=40, num_classes=10)
