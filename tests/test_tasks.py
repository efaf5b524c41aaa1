"""Tasks (issue 13): multi-class, binary, multi-label and regression, from labels to served outputs.

Metrics are checked against ``sklearn.metrics`` on the same predictions; every task is trained
in a small real federation, served over a real socket and scored by ``fedinfer predict``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from serving_harness import options_for, running_server
from sklearn import metrics as skm

from fedinfer.artifacts import ModelStore, load_torch_model
from fedinfer.config.validate import validate_config
from fedinfer.data import build_federated_data
from fedinfer.errors import ConfigError, DataError
from fedinfer.serving.predict import predict_file
from fedinfer.simulation import run_simulation
from fedinfer.tasks import (
    auc_score,
    compute_metrics,
    num_outputs,
    partition_labels,
    prepare_labels,
    serve_outputs,
    task_spec,
)

RNG = np.random.default_rng(0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


# --------------------------------------------------------------------------- metrics vs sklearn


def test_multiclass_metrics_match_sklearn() -> None:
    y = RNG.integers(0, 5, size=300)
    logits = RNG.normal(size=(300, 5)) + np.eye(5)[y] * 1.5
    pred = logits.argmax(1)
    got = compute_metrics("multiclass", y, logits)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))


@pytest.mark.parametrize("threshold", [0.5, 0.3], ids=["t0.5", "t0.3"])
def test_binary_metrics_match_sklearn(threshold: float) -> None:
    y = RNG.integers(0, 2, size=400)
    logit = RNG.normal(size=400) + (y - 0.5) * 1.2
    pred = (_sigmoid(logit) >= threshold).astype(int)
    got = compute_metrics("binary", y, logit[:, None], threshold=threshold)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y, logit))
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))


def test_multilabel_metrics_match_sklearn() -> None:
    y = RNG.integers(0, 2, size=(250, 4))
    logits = RNG.normal(size=(250, 4)) + (y - 0.5) * 2.0
    pred = (_sigmoid(logits) >= 0.5).astype(int)
    got = compute_metrics("multilabel", y.astype(np.float32), logits)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))  # exact match
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred, average="micro", zero_division=0))
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y, logits, average="macro"))


@pytest.mark.parametrize("targets", [1, 3], ids=["one-target", "three-targets"])
def test_regression_metrics_match_sklearn(targets: int) -> None:
    y = RNG.normal(size=(200, targets)) * 10 + 3
    pred = y + RNG.normal(size=(200, targets)) * 4
    labels = y[:, 0] if targets == 1 else y
    got = compute_metrics("regression", labels, pred)
    assert got["rmse"] == pytest.approx(skm.root_mean_squared_error(labels, pred.squeeze()))
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(labels, pred.squeeze()))
    assert got["r2"] == pytest.approx(skm.r2_score(labels, pred.squeeze()))


def test_auc_averages_tied_scores_like_sklearn() -> None:
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    score = np.array([0.1, 0.4, 0.4, 0.4, 0.9, 0.1, 0.4, 0.2])  # ties across classes
    assert auc_score(y, score) == pytest.approx(skm.roc_auc_score(y, score))
    assert auc_score(np.zeros(4), np.arange(4.0)) is None  # one class: undefined, left out


# --------------------------------------------------------------------------- labels and config


def test_labels_that_do_not_fit_the_task_give_one_line_errors() -> None:
    with pytest.raises(DataError, match=r"task.kind=binary needs labels 0 and 1") as exc:
        prepare_labels(np.array([0, 1, 2]), "binary", where="d.csv")
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match="multilabel needs a 0/1 label matrix"):
        prepare_labels(np.array([0, 1, 1]), "multilabel", where="d.npz")
    with pytest.raises(DataError, match="NaN or infinity"):
        prepare_labels(np.array([0.5, np.nan]), "regression", where="d.csv")
    with pytest.raises(DataError, match="needs one class per sample"):
        prepare_labels(np.zeros((3, 2), dtype=int), "binary", where="d.npz")


def test_task_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"`task.kind` is 'ranking' \(choose one of"):
        validate_config(tiny_config("task.kind=ranking", "privacy=none", "secagg=off"))
    with pytest.raises(ConfigError, match=r"`task.kind`=multilabel needs 0/1 label vectors"):
        validate_config(tiny_config("task=multilabel", "dataset=digits"))
    with pytest.raises(ConfigError, match=r"`task.threshold` must be in \(0, 1\)"):
        validate_config(tiny_config("task=binary", "task.threshold=1.5"))


def test_binary_task_on_ten_classes_is_refused_before_training(out_dir: Path) -> None:
    cfg = tiny_config("task=binary", "dataset=digits", "privacy=none", "secagg=off")
    with pytest.raises(DataError, match=r"dataset=digits: task.kind=binary needs labels 0 and 1"):
        run_simulation(cfg, output_dir=out_dir)


def test_a_custom_model_whose_output_does_not_fit_the_task_is_refused(out_dir: Path) -> None:
    """torch.nn.Linear with 10 outputs cannot be a 1-target regression: one line, before Ray."""
    cfg = tiny_config(
        "task=regression",
        "dataset=digits",
        "privacy=none",
        "secagg=off",
        "model=custom",
        "model._target_=torch.nn.Linear",
        "+model.kwargs.in_features=64",
        "+model.kwargs.out_features=10",
        "model.input_shape=[64]",
    )
    with pytest.raises(ConfigError) as exc:
        run_simulation(cfg, output_dir=out_dir)
    message = str(exc.value)
    assert "outputs (2, 10)" in message and "task.kind=regression needs (batch, 1)" in message
    assert "\n" not in message


def test_regression_partitions_quantile_bins_of_the_target() -> None:
    """No class labels to skew on a continuous target: dirichlet/shards split quantile bins."""
    target = RNG.normal(size=1000)
    bins = partition_labels(target, "regression", bins=10)
    assert sorted(np.unique(bins).tolist()) == list(range(10))
    assert np.bincount(bins).min() >= 95  # equal-frequency bins
    order = np.argsort(target)
    assert np.all(np.diff(bins[order]) >= 0)  # bins follow the target's order
    cfg = tiny_config(
        "task=regression", "dataset=digits", "partition=shards", "partition.labels_per_site=1"
    )
    sites = build_federated_data(cfg).sites
    ranges = [(s.train.y.min(), s.train.y.max()) for s in sites]
    assert all(s.train.y.dtype == np.float32 for s in sites)
    assert len({r for r in ranges}) > 1  # sites hold different parts of the target's range


def test_num_outputs_and_served_outputs_per_task() -> None:
    assert [num_outputs(k, 3) for k in ("binary", "multiclass", "multilabel", "regression")] == [
        1,
        3,
        3,
        3,
    ]
    raw = np.array([[0.0, 2.0], [-3.0, 0.1]], dtype=np.float32)
    out = serve_outputs("multilabel", raw, threshold=0.5)
    assert out["predicted_labels"].tolist() == [[1, 1], [0, 1]]
    np.testing.assert_allclose(out["probabilities"], _sigmoid(raw), rtol=1e-6)
    assert set(serve_outputs("regression", raw)) == {"values"}


# --------------------------------------------------------------------------- end to end


def _digits_multilabel(path: Path) -> Path:
    """Digits with three 0/1 labels per image: even, greater than 4, has a closed loop."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    d = digits.target
    y = np.stack([d % 2 == 0, d > 4, np.isin(d, [0, 6, 8, 9])], axis=1).astype(np.int64)
    np.savez(path, x=(digits.data / 16.0).astype(np.float32), y=y)
    return path


def _diabetes(path: Path) -> Path:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    np.savez(path, x=x.astype(np.float32) * 20, y=((y - y.mean()) / y.std()).astype(np.float32))
    return path


@dataclass
class Trained:
    task: str
    out: Path
    results: dict
    store: ModelStore
    test_x: np.ndarray
    test_y: np.ndarray


def _overrides(task: str, tmp: Path) -> list[str]:
    if task == "multiclass":
        return ["dataset=digits"]
    if task == "binary":
        return ["task=binary", "dataset=breast_cancer"]
    if task == "multilabel":
        path = _digits_multilabel(tmp / "m.npz")
        return ["task=multilabel", "dataset=csv", f"dataset.path={path}"]
    return ["task=regression", "dataset=csv", f"dataset.path={_diabetes(tmp / 'd.npz')}"]


@pytest.fixture(
    scope="module", params=["multiclass", "binary", "multilabel", "regression"], ids=str
)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    task = request.param
    tmp = tmp_path_factory.mktemp(task)
    cfg = tiny_config(
        *_overrides(task, tmp),
        "model=mlp",
        "model.hidden_sizes=[16]",
        "privacy=none",
        "secagg=off",
        "partition=dirichlet",
        "partition.alpha=1.0",
        "federation.rounds=3",
        "federation.lr=0.05",
    )
    result = run_simulation(cfg, output_dir=tmp / "run")
    data = build_federated_data(cfg)
    store = ModelStore(tmp / "run" / "sites" / "site-00" / "models")
    return Trained(
        task, tmp / "run", result.results, store, data.pooled_test.x, data.pooled_test.y
    )


def _raw(store: ModelStore, x: np.ndarray) -> np.ndarray:
    weights, manifest = store.load()
    with torch.inference_mode():
        return load_torch_model(weights, manifest)(torch.from_numpy(x)).numpy()


def test_each_task_reports_its_metrics_as_sklearn_computes_them(trained: Trained) -> None:
    """results.json's held-out metrics are sklearn's on the final model's predictions."""
    spec = task_spec(trained.task)
    rounds = trained.results["rounds"]
    assert all(list(r["metrics"]) == [m for m in spec.metrics] for r in rounds)
    assert trained.results["task"]["kind"] == trained.task
    assert (trained.out / "metrics.png").stat().st_size > 0
    final = trained.results["final_metrics"]
    raw, y = _raw(trained.store, trained.test_x), trained.test_y
    if trained.task == "regression":
        assert trained.results["final_accuracy"] is None
        assert final["rmse"] == pytest.approx(skm.root_mean_squared_error(y, raw[:, 0]), rel=1e-5)
        assert final["mae"] == pytest.approx(skm.mean_absolute_error(y, raw[:, 0]), rel=1e-5)
        assert final["r2"] == pytest.approx(skm.r2_score(y, raw[:, 0]), rel=1e-4, abs=1e-5)
        assert final["r2"] > 0  # it learned something: better than predicting the mean
        return
    if trained.task == "multiclass":
        pred = raw.argmax(1)
        assert final["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), rel=1e-6)
    elif trained.task == "binary":
        pred = (raw[:, 0] >= 0).astype(int)
        assert final["auc"] == pytest.approx(skm.roc_auc_score(y, raw[:, 0]), rel=1e-6)
        assert final["f1"] == pytest.approx(skm.f1_score(y, pred), rel=1e-6)
    else:
        pred = (raw >= 0).astype(int)
        assert final["f1"] == pytest.approx(skm.f1_score(y, pred, average="micro"), rel=1e-6)
        assert final["auc"] == pytest.approx(skm.roc_auc_score(y, raw), rel=1e-6)
    assert final["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert trained.results["final_accuracy"] == final["accuracy"]


def test_the_manifest_records_the_task_and_the_round_table_shows_its_metrics(
    trained: Trained,
) -> None:
    manifest = json.loads((trained.out / "model" / "manifest.json").read_text())
    assert manifest["task"]["kind"] == trained.task
    assert manifest["metrics"].keys() >= set(task_spec(trained.task).metrics)
    assert trained.store.load()[1].task_kind == trained.task  # signed and verified on load


def test_each_task_is_served_with_its_outputs_over_a_socket(trained: Trained) -> None:
    spec = task_spec(trained.task)
    x = trained.test_x[:7]
    expected = serve_outputs(trained.task, _raw(trained.store, x))
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    with running_server(options_for(trained.store.root)) as url:
        with httpx.Client(base_url=url, trust_env=False) as client:
            meta = client.get(f"/v2/models/{trained.store.load()[1].name}").json()
            answer = client.post(f"/v2/models/{meta['name']}/infer", json=body).json()
            wrong = client.post(
                f"/v2/models/{meta['name']}/infer",
                json={**body, "outputs": [{"name": "no_such_output"}]},
            )
    assert [o["name"] for o in meta["outputs"]] == list(spec.outputs)
    assert meta["parameters"]["task"] == trained.task
    served = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
    assert list(served) == list(spec.outputs)
    for name in spec.outputs:
        np.testing.assert_allclose(served[name], expected[name], rtol=1e-5, atol=1e-6)
    assert wrong.status_code == 400 and str(list(spec.outputs)) in wrong.json()["error"]


@pytest.mark.parametrize("fmt", ["csv", "npz"], ids=["csv", "npz"])
def test_predict_writes_the_task_outputs(trained: Trained, tmp_path: Path, fmt: str) -> None:
    x = trained.test_x[:9]
    src = tmp_path / "in.npz"
    np.savez(src, x=x)
    out = tmp_path / f"out.{fmt}"
    predict_file(trained.store, input_path=src, output_path=out, progress=False)
    expected = serve_outputs(trained.task, _raw(trained.store, x))
    if fmt == "npz":
        with np.load(out, allow_pickle=False) as arrays:
            got = {k: arrays[k] for k in arrays.files}
    else:
        got = pd.read_csv(out)
    if trained.task == "regression":
        values = got["values"][:, 0] if fmt == "npz" else got["value"].to_numpy()
        np.testing.assert_allclose(values, expected["values"][:, 0], rtol=1e-5)
    elif trained.task == "multilabel":
        labels = (
            got["predicted_labels"]
            if fmt == "npz"
            else got[[c for c in got.columns if c.startswith("label_")]].to_numpy()
        )
        np.testing.assert_array_equal(labels, expected["predicted_labels"])
    else:
        np.testing.assert_array_equal(
            np.asarray(got["predicted_class"]), expected["predicted_class"]
        )
        if trained.task == "binary" and fmt == "csv":
            np.testing.assert_allclose(got["prob_1"], expected["probabilities"][:, 0], rtol=1e-5)
            np.testing.assert_allclose(got["prob_0"] + got["prob_1"], 1.0, rtol=1e-5)


def test_a_deployment_carries_the_task_to_the_coordinator_and_the_sites(tmp_path: Path) -> None:
    """The coordinator is told only shapes; the site reads its own file for the task."""
    from fedinfer.data import load_site_file
    from fedinfer.deploy.apps import model_shape
    from fedinfer.fl.run_config import from_run_config, to_run_config

    cfg = tiny_config("task=regression", "deployment.input_dim=10", "deployment.num_classes=1")
    shape = model_shape(from_run_config(to_run_config(cfg)))  # what a SuperLink's app sees
    assert (shape.task, shape.num_outputs) == ("regression", 1)
    path = _diabetes(tmp_path / "site.npz")
    site = load_site_file(
        path, site_id="site-a", label_column="y", partition=cfg.partition, seed=0,
        num_classes=1, task="regression",
    )  # fmt: skip
    assert site.train.y.dtype == np.float32 and site.num_classes == 1
    with pytest.raises(ConfigError, match=r"1 targets per row but .*`deployment.num_classes`=2"):
        load_site_file(
            path, site_id="site-a", label_column="y", partition=cfg.partition, seed=0,
            num_classes=2, task="regression",
        )  # fmt: skip


def test_a_regression_sweep_reports_its_rmse_and_counts_as_finished() -> None:
    from fedinfer.reporting.sweep import JobResult, report_table, seed_summary
    from fedinfer.reporting.tracking import round_metrics

    jobs = [
        JobResult(
            job=str(seed),
            overrides={"seed": str(seed)},
            status="completed",
            final_metrics={"rmse": 0.7 + seed / 10, "mae": 0.5, "r2": 0.4},
        )
        for seed in (0, 1)
    ]
    table = report_table(jobs)
    assert table["final_rmse"].tolist() == pytest.approx([0.7, 0.8])
    summary = seed_summary(table, ["seed"])
    assert summary is not None and int(summary["seeds"][0]) == 2
    assert summary["final_rmse_mean"][0] == pytest.approx(0.75)
    flat = round_metrics({"round": 1, "accuracy": None, "metrics": {"rmse": 0.7, "r2": 0.4}})
    assert flat == {"rmse": 0.7, "r2": 0.4}


def test_the_task_is_signed_a_rewritten_task_is_refused(tmp_path: Path) -> None:
    """Attack: whoever can write the artifact turns a regression model's ``values`` into class
    labels by editing ``task.kind``; the signature covers the task, so verification fails."""
    from fedinfer.artifacts import generate_signing_key, verify_artifact, write_artifact
    from fedinfer.config.schema import ModelConfig
    from fedinfer.errors import ModelIntegrityError
    from fedinfer.models import build_model

    key = generate_signing_key()
    cfg = ModelConfig(name="logreg")
    model = build_model(cfg, input_dim=10, num_classes=1)
    art = write_artifact(
        tmp_path / "v1",
        weights={k: v.numpy() for k, v in model.state_dict().items()},
        model_cfg=cfg, input_dim=10, num_classes=1, version=1, server_round=1,
        metrics={"rmse": 0.7}, privacy={}, run_id="r", signing_key=key,
        task={"kind": "regression", "num_classes": 1},
    )  # fmt: skip
    assert verify_artifact(art, public_key=key.public_key()).task_kind == "regression"
    doc = json.loads((art / "manifest.json").read_text())
    doc["task"]["kind"] = "binary"  # one logit either way: the weights still fit
    (art / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelIntegrityError):
        verify_artifact(art, public_key=key.public_key())
    doc["task"] = {"kind": "ranking"}
    (art / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelIntegrityError, match="'task' must be an object with a known 'kind'"):
        verify_artifact(art, public_key=key.public_key())


def test_tritonclient_reads_every_task_output_in_binary_and_the_demo_scores_it(
    trained: Trained,
) -> None:
    import tritonclient.http as triton

    from fedinfer.simulation.serve_demo import query_site

    spec = task_spec(trained.task)
    x, y = trained.test_x[:16], trained.test_y[:16]
    expected = serve_outputs(trained.task, _raw(trained.store, x))
    name = trained.store.load()[1].name
    with running_server(options_for(trained.store.root)) as url:
        client = triton.InferenceServerClient(url=url.removeprefix("http://"))
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        wanted = [triton.InferRequestedOutput(o, binary_data=True) for o in spec.outputs]
        result = client.infer(name, inputs=[inp], outputs=wanted)
        client.close()
        answer = query_site(url, name, x, y, "site-00", task=trained.task)
    for output in spec.outputs:
        np.testing.assert_allclose(result.as_numpy(output), expected[output], rtol=1e-5, atol=1e-6)
    assert answer.metric == spec.headline
    scored = compute_metrics(trained.task, y, _raw(trained.store, x))[spec.headline]
    assert answer.accuracy == pytest.approx(scored, rel=1e-5)


@pytest.mark.parametrize("kind", ["regression", "multilabel"], ids=str)
def test_the_backend_check_measures_each_task(kind: str) -> None:
    """An approximate backend is judged by what the task serves: a regression backend that
    adds error is refused on its RMSE, a multi-label one on flipped labels."""
    from fedinfer.errors import ServingError
    from fedinfer.serving.backends import check_backend

    class Fixed:
        def __init__(self, out: np.ndarray, name: str) -> None:
            self.out, self.name = out, name

        def predict(self, x: np.ndarray) -> np.ndarray:
            return self.out

    raw = RNG.normal(size=(200, 3)).astype(np.float32)
    y = raw.copy() if kind == "regression" else (raw > 0).astype(np.float32)
    exact = check_backend(Fixed(raw, "onnx"), Fixed(raw, "torch"), raw, y, task=kind)
    assert exact.accuracy_drop == pytest.approx(0.0, abs=1e-9) and exact.agreement == 1.0
    worse = raw + RNG.normal(size=raw.shape).astype(np.float32) * 0.5
    with pytest.raises(ServingError, match="backend 'int8' loses"):
        check_backend(Fixed(worse, "int8"), Fixed(raw, "torch"), raw, y, task=kind)


@pytest.mark.parametrize("task", ["binary", "multilabel"], ids=str)
def test_dp_sgd_and_secure_aggregation_train_every_task(task: str, tmp_path: Path) -> None:
    """The task's loss goes through Opacus' per-sample clipping and the float update through
    secure aggregation; the sites report only epsilon, the coordinator evaluates the task."""
    cfg = tiny_config(
        *_overrides(task, tmp_path),
        "model=mlp",
        "model.hidden_sizes=[16]",
        "privacy=dpsgd",
        "privacy.target_epsilon=8",
        "secagg=on",
        "partition=iid",
    )
    results = run_simulation(cfg, output_dir=tmp_path / "run").results
    last = results["rounds"][-1]
    assert last["aggregated"] and last["secagg"]
    assert 0 < results["max_epsilon"] <= 8 + 1e-6
    assert set(results["final_metrics"]) == set(task_spec(task).metrics)
    assert results["final_metrics"]["auc"] > 0.5  # better than chance after 2 private rounds
    assert all(set(m) == {"epsilon", "num-examples"} for m in last["sites"].values())


def test_several_csv_label_columns_make_a_multilabel_matrix(tmp_path: Path) -> None:
    """``dataset.label_column='a,b,c'``: a 2-D ``y`` from a CSV; a missing column is named."""
    x = RNG.normal(size=(120, 5)).astype(np.float32)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    for j, name in enumerate("abc"):
        frame[name] = (x[:, j] > 0).astype(int)
    frame.to_csv(tmp_path / "tags.csv", index=False)
    cfg = tiny_config(
        "task=multilabel", "dataset=csv", f"dataset.path={tmp_path / 'tags.csv'}",
        "dataset.label_column='a,b,c'", "partition=dirichlet", "federation.num_sites=3",
    )  # fmt: skip
    validate_config(cfg)
    data = build_federated_data(cfg)
    assert data.num_classes == 3 and data.input_dim == 5
    assert data.sites[0].train.y.shape[1] == 3 and data.sites[0].train.y.dtype == np.float32
    with pytest.raises(DataError, match="'d' is not a column"):
        build_federated_data(tiny_config(
            "task=multilabel", "dataset=csv", f"dataset.path={tmp_path / 'tags.csv'}",
            "dataset.label_column='a,d'",
        ))  # fmt: skip


def test_the_round_table_shows_the_task_metrics() -> None:
    import io

    from rich.console import Console

    from fedinfer.fl.loop import RoundRecord
    from fedinfer.reporting.progress import RoundPrinter

    out = io.StringIO()
    printer = RoundPrinter(num_rounds=2, console=Console(file=out, width=150), task="regression")
    printer.line(RoundRecord(round=1, loss=0.5, metrics={"rmse": 0.71, "mae": 0.52, "r2": 0.41}))
    printer.line(RoundRecord(round=2, federated={"eval-rmse": 0.65}))  # a deployment: sites' mean
    header, first, second = out.getvalue().splitlines()
    assert header.split()[1:4] == ["rmse", "mae", "r2"] and "acc" not in header
    assert first.split()[1:5] == ["0.7100", "0.5200", "0.4100", "0.5000"]
    assert second.split()[1] == "0.6500*"


def test_sites_never_send_an_auc_that_cannot_be_averaged(tmp_path: Path) -> None:
    """A site whose test split holds one class has no AUC; Flower's weighted average of a key
    that some replies lack is silently biased, so no site sends one (the pooled AUC is exact)."""
    cfg = tiny_config(
        "task=binary", "dataset=breast_cancer", "privacy=none", "secagg=off", "model=logreg",
        "partition=shards", "partition.labels_per_site=1", "federation.rounds=1",
    )  # fmt: skip
    results = run_simulation(cfg, output_dir=tmp_path / "run").results
    first = results["rounds"][0]
    assert "eval-auc" not in first["federated"] and "eval-f1" in first["federated"]
    assert 0.0 <= first["metrics"]["auc"] <= 1.0


def test_several_regression_targets_train_serve_and_predict(tmp_path: Path) -> None:
    """A 2-D ``y`` of two targets: two outputs, per-target metrics averaged (as sklearn's
    uniform average), served ``values`` of shape [-1, 2], predict columns value_0, value_1."""
    x = RNG.normal(size=(400, 5)).astype(np.float32)
    y = (x @ RNG.normal(size=(5, 2)) + RNG.normal(size=(400, 2)) * 0.1).astype(np.float32)
    np.savez(tmp_path / "two.npz", x=x, y=y)
    cfg = tiny_config(
        "task=regression", "dataset=csv", f"dataset.path={tmp_path / 'two.npz'}",
        "model=logreg", "privacy=none", "secagg=off", "partition=dirichlet", "federation.rounds=3",
    )  # fmt: skip
    results = run_simulation(cfg, output_dir=tmp_path / "run").results
    assert results["task"]["num_outputs"] == 2 and results["final_metrics"]["r2"] > 0.5
    store = ModelStore(tmp_path / "run" / "sites" / "site-00" / "models")
    with running_server(options_for(store.root)) as url:
        meta = httpx.get(f"{url}/v2/models/logreg", trust_env=False).json()
    assert meta["outputs"] == [{"name": "values", "datatype": "FP32", "shape": [-1, 2]}]
    np.savez(tmp_path / "in.npz", x=x[:5])
    predict_file(
        store, input_path=tmp_path / "in.npz", output_path=tmp_path / "out.csv", progress=False
    )
    scored = pd.read_csv(tmp_path / "out.csv")
    assert list(scored.columns) == ["value_0", "value_1", "error"]
    np.testing.assert_allclose(scored[["value_0", "value_1"]], _raw(store, x[:5]), rtol=1e-5)
