"""Batch scoring: CSV / Parquet / NPZ, order and ids kept, bad rows reported not fatal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from artifact_factory import INPUT_DIM, NUM_CLASSES, publish_versions

from fedinfer.artifacts import generate_signing_key, load_torch_model
from fedinfer.cli import main as cli_main
from fedinfer.errors import DataError
from fedinfer.serving.predict import predict_file


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    return publish_versions(tmp_path_factory.mktemp("site"), generate_signing_key(), [1])


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, INPUT_DIM)).astype(np.float32)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(INPUT_DIM)])
    frame.insert(0, "patient", [f"p{i:03d}" for i in range(25)])
    frame["label"] = rng.integers(0, NUM_CLASSES, size=25)
    return frame


def _expected_classes(store, x: np.ndarray) -> np.ndarray:
    weights, manifest = store.load()
    with torch.inference_mode():
        return load_torch_model(weights, manifest)(torch.from_numpy(x)).argmax(1).numpy()


def _features(frame: pd.DataFrame) -> np.ndarray:
    return frame[[f"f{i}" for i in range(INPUT_DIM)]].to_numpy(np.float32).copy()


@pytest.mark.parametrize("fmt", ["csv", "parquet"], ids=["csv", "parquet"])
def test_tabular_scoring_keeps_order_ids_and_reports_bad_rows(
    tmp_path: Path, store, table: pd.DataFrame, fmt: str
) -> None:
    # Prepare: row 4 (1-based) non-numeric, row 10 missing, row 17 infinite
    frame = table.astype({"f3": object})
    frame.loc[3, "f3"] = "abc"
    frame.loc[9, "f7"] = np.nan
    frame.loc[16, "f1"] = np.inf
    src, out = tmp_path / f"in.{fmt}", tmp_path / f"out.{fmt}"
    if fmt == "csv":
        frame.to_csv(src, index=False)
    else:
        frame.astype({"f3": str}).to_parquet(src)
    # Execute: chunk size 6 so rows cross chunk boundaries
    report = predict_file(
        store, input_path=src, output_path=out, id_column="patient", chunk_size=6, progress=False
    )
    scored = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
    # Assert
    bad = dict(report.bad_rows)
    if fmt == "csv":
        assert bad == {
            4: "non-numeric value in column 'f3'",
            10: "missing (NaN) value in column 'f7'",
            17: "infinite value in column 'f1'",
        }
    else:
        assert set(bad) == {4, 10, 17}
    assert report.rows == 25 and list(scored["patient"]) == list(table["patient"])
    good = [i for i in range(25) if i + 1 not in bad]
    expected = _expected_classes(store, _features(table)[good])
    assert scored["predicted_class"].iloc[good].astype(int).tolist() == expected.tolist()
    assert scored["predicted_class"].iloc[[3, 9, 16]].isna().all()
    assert scored.loc[3, "error"] == bad[4]
    probs = scored[[f"prob_{c}" for c in range(NUM_CLASSES)]].to_numpy()
    np.testing.assert_allclose(probs[good].sum(axis=1), 1.0, rtol=1e-5)


def test_npz_scoring_with_ids_and_a_nan_row(tmp_path: Path, store, table: pd.DataFrame) -> None:
    # Prepare
    x = _features(table)
    x[5, 0] = np.nan
    ids = np.arange(100, 125)
    np.savez(tmp_path / "in.npz", x=x, ids=ids)
    # Execute
    report = predict_file(
        store,
        input_path=tmp_path / "in.npz",
        output_path=tmp_path / "o.npz",
        id_column="ids",
        chunk_size=7,
        progress=False,
    )
    with np.load(tmp_path / "o.npz", allow_pickle=False) as out:
        # Assert
        assert report.bad_rows == [(6, "missing (NaN) value in column 'f0'")]
        assert out["ids"].tolist() == ids.tolist()
        assert out["predicted_class"][5] == -1 and out["error"][5].startswith("missing")
        good = np.arange(25) != 5
        assert out["predicted_class"][good].tolist() == _expected_classes(store, x[good]).tolist()
        assert out["probabilities"].shape == (25, NUM_CLASSES)


def test_strict_mode_stops_at_the_first_bad_row(tmp_path: Path, store, table) -> None:
    frame = table.copy()
    frame.loc[2, "f0"] = np.nan
    frame.to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(DataError, match=r"row 3: missing \(NaN\) value"):
        predict_file(
            store,
            input_path=tmp_path / "in.csv",
            output_path=tmp_path / "o.csv",
            id_column="patient",
            strict=True,
            progress=False,
        )
    assert not (tmp_path / "o.csv").exists()


def test_cli_predict_reports_bad_rows_and_wrong_columns(
    tmp_path: Path, store, table, capsys
) -> None:
    # Prepare
    frame = table.copy()
    frame.loc[0, "f0"] = np.nan
    frame.to_csv(tmp_path / "in.csv", index=False)
    args = [
        "predict",
        "--model-store",
        str(store.root),
        "--input",
        str(tmp_path / "in.csv"),
        "--output",
        str(tmp_path / "o.csv"),
        "--no-progress",
    ]
    # Execute
    ok = cli_main([*args, "--id-column", "patient"])
    ok_io = capsys.readouterr()
    wrong = cli_main(args)  # without --id-column the id column counts as a feature
    wrong_io = capsys.readouterr()
    # Assert
    assert ok == 0 and "row 1: missing (NaN) value in column 'f0'" in ok_io.err
    assert "scored 24 of 25 rows" in ok_io.out
    assert wrong == 2 and "41 feature columns" in wrong_io.err


def _predict_args(store, src: Path, out: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--model-store",
        str(store.root),
        "--input",
        str(src),
        "--output",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_cli_predict_refuses_a_csv_whose_header_is_a_data_row(
    tmp_path: Path, store, table: pd.DataFrame, capsys
) -> None:
    """A headerless CSV must not lose its first row to pandas' header inference."""
    # Prepare: 10 rows of features, no header row
    src, out = tmp_path / "noheader.csv", tmp_path / "o.csv"
    table[[f"f{i}" for i in range(INPUT_DIM)]].head(10).to_csv(src, index=False, header=False)
    # Execute
    code = cli_main(_predict_args(store, src, out))
    io = capsys.readouterr()
    # Assert: one line naming both fixes, nothing written
    assert code == 2 and not out.exists()
    first = io.err.splitlines()[0]
    assert "first row" in first and "--no-header" in first and "header row" in first
    assert "Traceback" not in io.err


def test_cli_predict_no_header_scores_every_row(
    tmp_path: Path, store, table: pd.DataFrame, capsys
) -> None:
    # Prepare: id in column 0, then the features, no header row
    src, out = tmp_path / "noheader.csv", tmp_path / "o.csv"
    frame = table[["patient", *(f"f{i}" for i in range(INPUT_DIM))]].head(10)
    frame.to_csv(src, index=False, header=False)
    # Execute
    code = cli_main(_predict_args(store, src, out, "--no-header", "--id-column", "0"))
    io = capsys.readouterr()
    scored = pd.read_csv(out, dtype={"0": str})
    # Assert: all 10 rows, in order, with the first row's prediction right
    assert code == 0 and "scored 10 of 10 rows" in io.out
    assert scored["0"].tolist() == table["patient"].head(10).tolist()
    expected = _expected_classes(store, _features(table.head(10)))
    assert scored["predicted_class"].astype(int).tolist() == expected.tolist()


@pytest.mark.parametrize(
    "header",
    [
        [str(i) for i in range(INPUT_DIM)],  # pandas' names for a bare array
        [str(i) for i in range(1, INPUT_DIM + 1)],
    ],
    ids=["from-0", "from-1"],
)
def test_cli_predict_accepts_numbered_column_names_as_a_header(
    tmp_path: Path, store, table: pd.DataFrame, header: list[str], capsys
) -> None:
    src, out = tmp_path / "numbered.csv", tmp_path / "o.csv"
    frame = table[[f"f{i}" for i in range(INPUT_DIM)]].head(5)
    frame.set_axis(header, axis=1).to_csv(src, index=False)
    assert cli_main(_predict_args(store, src, out)) == 0
    assert "scored 5 of 5 rows" in capsys.readouterr().out


def test_cli_predict_header_option_overrides_the_check(
    tmp_path: Path, store, table: pd.DataFrame, capsys
) -> None:
    """Column names that happen to be numbers (years, codes) can be forced as a header."""
    src, out = tmp_path / "years.csv", tmp_path / "o.csv"
    frame = table[[f"f{i}" for i in range(INPUT_DIM)]].head(5)
    frame.set_axis([str(1980 + 2 * i) for i in range(INPUT_DIM)], axis=1).to_csv(src, index=False)
    assert cli_main(_predict_args(store, src, out)) == 2
    capsys.readouterr()
    assert cli_main(_predict_args(store, src, out, "--header")) == 0
    assert "scored 5 of 5 rows" in capsys.readouterr().out


def test_cli_predict_strict_reports_the_first_bad_row_and_column(
    tmp_path: Path, store, table: pd.DataFrame, capsys
) -> None:
    """Bad values in several columns: --strict names the earliest row, not the first column's."""
    # Prepare: row 5 bad in f0, row 2 bad in f9 (a later column), both in one chunk
    frame = table.astype({"f9": object})
    frame.loc[4, "f0"] = np.nan
    frame.loc[1, "f9"] = "abc"
    src, out = tmp_path / "in.csv", tmp_path / "o.csv"
    frame.to_csv(src, index=False)
    # Execute
    strict = cli_main(_predict_args(store, src, out, "--id-column", "patient", "--strict"))
    strict_io = capsys.readouterr()
    strict_wrote = out.exists()
    lenient = cli_main(_predict_args(store, src, out, "--id-column", "patient"))
    lenient_io = capsys.readouterr()
    # Assert
    assert strict == 2 and not strict_wrote
    assert "row 2: non-numeric value in column 'f9'" in strict_io.err.splitlines()[0]
    assert lenient == 0
    assert lenient_io.err.splitlines()[:2] == [
        "row 2: non-numeric value in column 'f9'",
        "row 5: missing (NaN) value in column 'f0'",
    ]


def test_cli_predict_of_one_row_says_row(tmp_path: Path, store, table: pd.DataFrame, capsys):
    src, out = tmp_path / "one.csv", tmp_path / "o.csv"
    table.head(1).to_csv(src, index=False)
    assert cli_main(_predict_args(store, src, out, "--id-column", "patient")) == 0
    assert "scored 1 of 1 row with version 1" in capsys.readouterr().out


@pytest.mark.parametrize("no_header", [False, True], ids=["header", "no-header"])
def test_cli_predict_names_the_row_with_too_many_values(
    tmp_path: Path, store, table: pd.DataFrame, no_header: bool, capsys
) -> None:
    # Prepare: data row 3 has one value too many
    src, out = tmp_path / "ragged.csv", tmp_path / "o.csv"
    features = table[[f"f{i}" for i in range(INPUT_DIM)]].head(5)
    lines = features.to_csv(index=False, header=not no_header).splitlines()
    lines[2 if no_header else 3] += ",0.5"
    src.write_text("\n".join(lines) + "\n")
    # Execute
    extra = ["--no-header"] if no_header else []
    code = cli_main(_predict_args(store, src, out, "--strict", *extra))
    first = capsys.readouterr().err.splitlines()[0]
    # Assert
    assert code == 2 and not out.exists()
    assert f"row 3 has {INPUT_DIM + 1} values but the file has {INPUT_DIM} columns" in first
