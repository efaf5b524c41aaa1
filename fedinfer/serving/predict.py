"""Batch scoring of CSV / Parquet / NPZ files with the store's current model.

Rows stream through in chunks (memory stays flat for large files), keep their
order and ids, and gain the task's output columns and an ``error`` column:
``predicted_class`` and ``prob_<class>`` (multiclass; binary: ``prob_0``, ``prob_1``),
``label_<j>`` and ``prob_<j>`` (multilabel), ``value`` or ``value_<j>`` (regression). A bad
row (missing or non-numeric value, NaN/inf) is reported with its 1-based data row number and
reason and left unscored; with
``strict=True`` the first bad row stops the run instead.

A CSV's first row is its header. When every name in it is a number (other than
the column numbers ``0..n-1`` or ``1..n`` that writers give unnamed columns),
the file most likely has no header and pandas would silently eat a data row, so
the run is refused unless ``header`` says which it is.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedinfer.artifacts import ModelManifest, ModelStore
from fedinfer.errors import DataError
from fedinfer.serving.backends import Backend
from fedinfer.serving.model_manager import run_outputs

__all__ = ["PredictReport", "predict_file", "read_labelled"]

_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}


@dataclass
class PredictReport:
    """What a scoring run did."""

    output: Path
    rows: int = 0
    model_version: int = 0
    bad_rows: list[tuple[int, str]] = field(default_factory=list)
    """(1-based data row number, reason) of every row that could not be scored."""


def _format(path: Path, what: str) -> str:
    kind = _FORMATS.get(Path(path).suffix.lower())
    if kind is None:
        raise DataError(f"{what} {path}: unsupported file type; use .csv, .parquet or .npz")
    return kind


def predict_file(
    store: ModelStore,
    *,
    input_path: Path,
    output_path: Path,
    id_column: str | None = None,
    label_column: str | None = "label",
    chunk_size: int = 8192,
    strict: bool = False,
    backend: str = "torch",
    prune_amount: float = 0.0,
    version: int | None = None,
    progress: bool = True,
    public_key: Ed25519PublicKey | None = None,
    header: bool | None = None,
) -> PredictReport:
    """Score ``input_path`` into ``output_path`` (format by extension, written atomically).

    Parameters
    ----------
    store : ModelStore
        The site's store; ``version`` (default: current) is loaded and hash-checked.
    input_path, output_path : Path
        ``.csv``, ``.parquet`` or ``.npz`` (NPZ: features in ``x``, optional ids and labels).
    id_column : str or None
        Column (NPZ: array) copied to the output to identify rows (default: None).
    label_column : str or None
        Column ignored as a feature if present (default: ``"label"``).
    chunk_size : int
        Rows per chunk (default: 8192).
    strict : bool
        Stop at the first bad row with :class:`DataError` (default: False).
    backend : str
        ``torch``, ``int8`` or ``onnx`` (default: ``torch``).
    prune_amount : float
        Share of smallest weights zeroed first (default: 0, see ``prune_model``).
    progress : bool
        Show a rich progress bar on stderr (default: True).
    public_key : Ed25519PublicKey or None
        If given, the model's signature is verified again before scoring (default: None;
        the hash is always checked).
    header : bool or None
        CSV only: ``True`` the first row is the header, ``False`` there is none and
        columns are named by their number ``"0"``, ``"1"``, ... (so ``id_column="0"``);
        ``None`` refuses a first row that looks like data (default: None).

    Examples
    --------
    >>> report = predict_file(ModelStore(Path("site/models")), input_path=Path("in.csv"),
    ...                       output_path=Path("scored.csv"), id_column="id")  # doctest: +SKIP
    """
    from fedinfer.serving.backends import build_backend

    in_kind, out_kind = _format(input_path, "--input"), _format(output_path, "--output")
    if not Path(input_path).is_file():
        raise DataError(f"--input {input_path} does not exist")
    weights, manifest = store.load(version, public_key=public_key)
    model = build_backend(backend, weights, manifest, prune_amount=prune_amount)
    report = PredictReport(Path(output_path), model_version=manifest.version)
    csv_header = _csv_header(Path(input_path), header) if in_kind == "csv" else None
    chunks = _read_chunks(Path(input_path), in_kind, chunk_size, id_column, csv_header)
    writer = _Writer(Path(output_path), out_kind)
    try:
        with _progress_bar(progress, _count_rows(Path(input_path), in_kind)) as advance:
            for start, ids, features in chunks:
                frame = _score_chunk(
                    model, manifest, start, ids, features, id_column, label_column, report, strict
                )
                writer.write(frame)
                report.rows += len(frame)
                advance(len(frame))
        writer.commit()
    finally:
        writer.discard()
    return report


def _csv_header(path: Path, header: bool | None) -> list[str] | None:
    """Column names of a headerless CSV (by number), or None when row 1 is the header."""
    if header is True:
        return None
    with open(path, newline="", encoding="utf-8-sig") as fh:
        first = next(csv.reader(fh), [])
    if header is False:
        return [str(i) for i in range(len(first))]
    if _looks_like_data(first):
        raise DataError(
            f"--input {path}: the first row looks like data, not a header (every column "
            f"name is a number: {', '.join(first[:3])}, ...); pass --no-header to score it "
            "as a row, or add a header row (--header if it already is one)"
        )
    return None


def _looks_like_data(names: list[str]) -> bool:
    values: list[float] = []
    for name in (n.strip() for n in names):
        if not name:  # an unnamed (index) column: pandas writes its name empty
            continue
        try:
            values.append(float(name))
        except ValueError:
            return False
    numbered = [list(map(float, range(k, k + len(values)))) for k in (0, 1)]
    return bool(values) and values not in numbered


def _read_chunks(
    path: Path,
    kind: str,
    chunk_size: int,
    id_column: str | None,
    names: list[str] | None = None,
) -> Iterator[tuple[int, pd.Series | None, pd.DataFrame]]:
    start = 0
    for frame in _read_frames(path, kind, chunk_size, id_column, names):
        ids = None
        if id_column is not None:
            if id_column not in frame.columns:
                hint = "" if names else "; without a header row, use --no-header --id-column 0"
                raise DataError(
                    f"--id-column {id_column!r} is not in {path} "
                    f"(columns: {list(frame.columns)[:10]}){hint}"
                )
            ids = frame[id_column].reset_index(drop=True)
            frame = frame.drop(columns=[id_column])
        yield start, ids, frame.reset_index(drop=True)
        start += len(frame)


def _read_frames(
    path: Path,
    kind: str,
    chunk_size: int,
    id_column: str | None,
    names: list[str] | None = None,
) -> Iterator[pd.DataFrame]:
    try:
        if kind == "csv":
            dtype = {id_column: str} if id_column else None
            header = None if names else "infer"
            yield from pd.read_csv(
                path, chunksize=chunk_size, dtype=dtype, header=header, names=names
            )
        elif kind == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_size):
                yield batch.to_pandas()
        else:
            yield from _npz_frames(path, chunk_size, id_column)
    except pd.errors.ParserError as exc:
        ragged = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if ragged is None:
            raise DataError(f"cannot read {path}: {exc}") from None
        expected, line, saw = (int(v) for v in ragged.groups())
        row = line - (0 if names else 1)  # pandas counts the header line
        raise DataError(
            f"{path}: row {row} has {saw} values but the file has {expected} columns; "
            "fix that row (a stray comma or an unquoted value with a comma)"
        ) from None
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _npz_frames(path: Path, chunk_size: int, id_column: str | None) -> Iterator[pd.DataFrame]:
    with np.load(path, allow_pickle=False) as npz:
        if "x" not in npz.files:
            raise DataError(
                f"{path}: NPZ input needs the features in an array named 'x' (found {npz.files})"
            )
        x = npz["x"]
        if x.ndim > 2:  # images etc.: one flat row per sample, the model reshapes it
            x = x.reshape(x.shape[0], -1)
        if x.ndim != 2:
            raise DataError(f"{path}: 'x' must be 2-D (rows, features), got shape {x.shape}")
        ids = npz[id_column] if id_column and id_column in npz.files else None
        if id_column and ids is None:
            raise DataError(f"--id-column {id_column!r} is not an array in {path} ({npz.files})")
        for start in range(0, len(x), chunk_size):
            frame = pd.DataFrame(
                x[start : start + chunk_size], columns=[f"f{i}" for i in range(x.shape[1])]
            )
            if ids is not None:
                frame.insert(0, str(id_column), ids[start : start + chunk_size])
            yield frame


def _count_rows(path: Path, kind: str) -> int | None:
    if kind == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    if kind == "npz":
        with np.load(path, allow_pickle=False) as npz:
            return int(npz["x"].shape[0]) if "x" in npz.files else None
    return None


def _score_chunk(
    model: Backend,
    manifest: ModelManifest,
    start: int,
    ids: pd.Series | None,
    features: pd.DataFrame,
    id_column: str | None,
    label_column: str | None,
    report: PredictReport,
    strict: bool,
) -> pd.DataFrame:
    if label_column is not None:  # one column, or `a,b,c` (multi-label / several targets)
        from fedinfer.data.datasets import label_columns

        present = [c for c in label_columns(label_column) if c in features.columns]
        features = features.drop(columns=present)
    if features.shape[1] != manifest.input_dim:
        raise DataError(
            f"input has {features.shape[1]} feature columns but model "
            f"{manifest.name!r} v{manifest.version} expects {manifest.input_dim}; "
            "use --id-column / --label-column to exclude non-features"
        )
    x, reasons = _coerce(features)
    for offset, reason in sorted(reasons.items()):  # row order, not column order
        if strict:
            raise DataError(f"row {start + offset + 1}: {reason} (--strict)")
        report.bad_rows.append((start + offset + 1, reason))
    good = np.array([i not in reasons for i in range(len(x))], dtype=bool)
    return _result_frame(model, manifest, x, good, reasons, ids, id_column)


def _coerce(features: pd.DataFrame) -> tuple[np.ndarray, dict[int, str]]:
    reasons: dict[int, str] = {}
    columns = []
    for name in features.columns:
        raw = features[name]
        numeric = pd.to_numeric(raw, errors="coerce")
        values = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
        for i in np.flatnonzero(~np.isfinite(values)):
            if int(i) in reasons:
                continue
            if pd.isna(raw.iloc[i]):
                reasons[int(i)] = f"missing (NaN) value in column {name!r}"
            elif pd.isna(numeric.iloc[i]):
                reasons[int(i)] = f"non-numeric value in column {name!r}"
            else:
                reasons[int(i)] = f"infinite value in column {name!r}"
        columns.append(values)
    x = np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((len(features), 0))
    overflow = np.flatnonzero(~np.isfinite(x).all(axis=1))
    for i in overflow:
        reasons.setdefault(int(i), "value out of float32 range")
    return x, reasons


def _result_frame(
    model: Backend,
    manifest: ModelManifest,
    x: np.ndarray,
    good: np.ndarray,
    reasons: dict[int, str],
    ids: pd.Series | None,
    id_column: str | None,
) -> pd.DataFrame:
    n, width, kind = len(x), manifest.num_classes, manifest.task_kind
    out = (
        run_outputs(
            model, np.ascontiguousarray(x[good]), task=kind, threshold=manifest.threshold
        )
        if good.any()
        else {}
    )
    data: dict[str, Any] = {}
    if ids is not None:
        data[str(id_column)] = ids.to_numpy()
    if kind == "regression":
        values = _fill(n, width, good, out.get("values"))
        names = ["value"] if width == 1 else [f"value_{j}" for j in range(width)]
        data.update({name: values[:, j] for j, name in enumerate(names)})
    elif kind == "multilabel":
        labels = _fill(n, width, good, out.get("predicted_labels"))
        probs = _fill(n, width, good, out.get("probabilities"))
        data.update({f"label_{j}": _nullable_int(labels[:, j]) for j in range(width)})
        data.update({f"prob_{j}": probs[:, j] for j in range(width)})
    else:
        _class_columns(data, manifest, n, good, out)
    data["error"] = [reasons.get(i, "") for i in range(n)]
    return pd.DataFrame(data)


def _fill(n: int, width: int, good: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """``(n, width)`` float32 with ``values`` in the good rows and NaN elsewhere."""
    full = np.full((n, width), np.nan, dtype=np.float32)
    if values is not None:
        full[good] = values.reshape(-1, width)
    return full


def _nullable_int(column: np.ndarray) -> Any:
    """A float column with NaN for unscored rows as pandas' nullable Int64."""
    ints = pd.array(np.nan_to_num(column, nan=-1).astype(np.int64), dtype="Int64")
    ints[np.isnan(column)] = pd.NA
    return ints


def _class_columns(
    data: dict[str, Any],
    manifest: ModelManifest,
    n: int,
    good: np.ndarray,
    out: dict[str, np.ndarray],
) -> None:
    """``predicted_class`` [``predicted_label``] ``prob_<class>`` (binary: prob_0, prob_1)."""
    classes = 2 if manifest.task_kind == "binary" else manifest.num_classes
    probs = np.full((n, classes), np.nan, dtype=np.float32)
    predicted = pd.array([pd.NA] * n, dtype="Int64")
    if good.any():
        p = out["probabilities"]
        probs[good] = np.concatenate([1 - p, p], axis=1) if classes == 2 and p.shape[1] == 1 else p
        predicted[good] = out["predicted_class"]
    labels = list(manifest.class_labels) if manifest.class_labels else None
    if labels is not None and len(labels) != classes:
        labels = None
    data["predicted_class"] = predicted
    if labels is not None:
        data["predicted_label"] = [labels[int(c)] if c is not pd.NA else None for c in predicted]
    for c in range(classes):
        data[f"prob_{labels[c] if labels else c}"] = probs[:, c]


class _Writer:
    """Chunked writer to a temporary file, renamed onto the output at the end."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.kind = path, kind
        self.tmp = path.with_name(f".{path.name}.partial")
        self._parquet: Any = None
        self._frames: list[pd.DataFrame] = []
        self._first = True

    def write(self, frame: pd.DataFrame) -> None:
        if self.kind == "csv":
            frame.to_csv(
                self.tmp, mode="w" if self._first else "a", header=self._first, index=False
            )
        elif self.kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.tmp, table.schema)
            self._parquet.write_table(table.cast(self._parquet.schema))
        else:
            self._frames.append(frame)  # NPZ cannot be appended to
        self._first = False

    def commit(self) -> None:
        if self.kind == "parquet" and self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self.kind == "npz":
            self._write_npz()
        if self._first:  # empty input: still write a valid (empty) file
            self.write(pd.DataFrame({"predicted_class": pd.array([], dtype="Int64")}))
            self.commit()
            return
        os.replace(self.tmp, self.path)

    def _write_npz(self) -> None:
        if not self._frames:
            return
        frame = pd.concat(self._frames, ignore_index=True)

        def columns(prefix: str) -> list[str]:
            return [c for c in frame.columns if str(c).startswith(prefix)]

        arrays: dict[str, np.ndarray] = {}
        if "predicted_class" in frame.columns:
            arrays["predicted_class"] = frame["predicted_class"].fillna(-1).to_numpy(np.int64)
        if columns("label_"):
            arrays["predicted_labels"] = frame[columns("label_")].fillna(-1).to_numpy(np.int64)
        if columns("prob_"):
            arrays["probabilities"] = frame[columns("prob_")].to_numpy(dtype=np.float32)
        if columns("value"):
            arrays["values"] = frame[columns("value")].to_numpy(dtype=np.float32)
        arrays["error"] = frame["error"].to_numpy(dtype=str)
        first = str(frame.columns[0])
        outputs = ("predicted_class", "error", "predicted_label")
        if first not in outputs and not first.startswith(("label_", "prob_", "value")):
            arrays[first] = frame[first].to_numpy()
        with open(self.tmp, "wb") as fh:
            np.savez(fh, **arrays)

    def discard(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        self.tmp.unlink(missing_ok=True)


class _progress_bar:  # noqa: N801 - used like a function in a with-statement
    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled, self.total = enabled, total
        self._progress: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import Progress

        self._progress = Progress(console=Console(file=sys.stderr), transient=True)
        self._progress.start()
        task = self._progress.add_task("scoring", total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def read_labelled(
    path: Path, *, label_column: str = "label", task: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole labelled split: features (float32) and labels.

    CSV/Parquet: every column but ``label_column`` is a feature. NPZ: arrays
    ``x`` and ``y`` (or ``label_column``). Labels are int64 class ids, or float32 for a
    regression or multi-label ``task`` (None: float32 unless every label is an integer).
    """
    y = _read_labelled(path, label_column)
    if task is None:
        task = "multiclass" if y[1].ndim == 1 and np.all(np.mod(y[1], 1) == 0) else "regression"
    label_dtype = np.float32 if task in ("regression", "multilabel") else np.int64
    return y[0], y[1].astype(label_dtype)


def _read_labelled(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    kind = _format(path, "--validation-data")
    if kind == "npz":
        with np.load(path, allow_pickle=False) as npz:
            key = "y" if "y" in npz.files else label_column
            if "x" not in npz.files or key not in npz.files:
                raise DataError(f"{path}: NPZ needs arrays 'x' and 'y' (found {npz.files})")
            return npz["x"].astype(np.float32), npz[key].astype(np.float64)
    frame = pd.concat(_read_frames(Path(path), kind, 65536, None), ignore_index=True)
    if label_column not in frame.columns:
        raise DataError(f"{path} has no label column {label_column!r}")
    y = frame.pop(label_column).to_numpy(dtype=np.float64)
    return frame.to_numpy(dtype=np.float32), y
