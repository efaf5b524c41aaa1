"""Learning tasks: what the labels are, what the model outputs, how both are scored and served.

One task per federation, ``task.kind`` (group ``task``):

* ``multiclass``: int64 labels ``(n,)`` in ``0..K-1``; K logits; cross-entropy;
  metrics accuracy, f1 (macro).
* ``binary``: int64 labels ``(n,)`` in {0, 1}; one logit; BCE with logits;
  metrics accuracy, auc, f1.
* ``multilabel``: float32 0/1 labels ``(n, K)``; K logits; BCE with logits;
  metrics accuracy (exact match), f1 (micro), auc (macro over labels).
* ``regression``: float32 targets ``(n,)`` or ``(n, K)``; K values; mean squared error;
  metrics rmse, mae, r2.

The first metric is the headline (progress table, ``final_accuracy`` / ``final_metrics``).
The data layer's ``num_classes`` is the size of the label space (classes; 2 for binary;
labels; regression targets); :func:`num_outputs` is the model's output width. Served outputs
(:func:`serve_outputs`): ``logits``, ``probabilities`` and ``predicted_class`` (multiclass,
binary), ``logits``, ``probabilities`` and ``predicted_labels`` (multilabel), ``values``
(regression). Everything here is NumPy only: the serving process uses it too. The metrics are
checked against ``sklearn.metrics`` in ``tests/test_tasks.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedinfer.errors import ConfigError, DataError

__all__ = [
    "TASK_KINDS",
    "TaskSpec",
    "auc_score",
    "compute_metrics",
    "f1_score",
    "num_outputs",
    "output_specs",
    "partition_labels",
    "prepare_labels",
    "serve_outputs",
    "task_spec",
]


@dataclass(frozen=True)
class TaskSpec:
    """The fixed facts of one task kind."""

    kind: str
    metrics: tuple[str, ...]
    """Metric names in table order; the first is the headline (progress table, final_*)."""
    higher_is_better: bool
    """Of the headline metric (accuracy: yes; rmse: no)."""
    outputs: tuple[str, ...]
    """Names of the served output tensors."""
    loss_name: str

    @property
    def headline(self) -> str:
        """The metric a run is judged by (``accuracy``, or ``rmse`` for regression)."""
        return self.metrics[0]


_SPECS = {
    "binary": TaskSpec(
        "binary",
        ("accuracy", "auc", "f1"),
        True,
        ("logits", "probabilities", "predicted_class"),
        "binary cross-entropy",
    ),
    "multiclass": TaskSpec(
        "multiclass",
        ("accuracy", "f1"),
        True,
        ("logits", "probabilities", "predicted_class"),
        "cross-entropy",
    ),
    "multilabel": TaskSpec(
        "multilabel",
        ("accuracy", "f1", "auc"),
        True,
        ("logits", "probabilities", "predicted_labels"),
        "binary cross-entropy",
    ),
    "regression": TaskSpec("regression", ("rmse", "mae", "r2"), False, ("values",), "mse"),
}
TASK_KINDS: tuple[str, ...] = tuple(sorted(_SPECS))


def task_spec(kind: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``kind``; a one-line :class:`ConfigError` for an unknown one."""
    spec = _SPECS.get(kind)
    if spec is None:
        raise ConfigError(
            f"`task.kind` is {kind!r}; choose one of {', '.join(TASK_KINDS)} (e.g. task=regression)"
        )
    return spec


def num_outputs(kind: str, num_classes: int) -> int:
    """The model's output width: one logit for binary, else the size of the label space.

    Examples
    --------
    >>> num_outputs("binary", 2), num_outputs("multiclass", 10), num_outputs("regression", 1)
    (1, 10, 1)
    """
    task_spec(kind)
    return 1 if kind == "binary" else int(num_classes)


# --------------------------------------------------------------------------- labels


def prepare_labels(y: np.ndarray, kind: str, *, where: str) -> tuple[np.ndarray, int]:
    """Check and convert raw labels for ``kind``; return ``(labels, num_classes)``.

    Multiclass labels are the data layer's business (re-indexed there); this handles the
    other kinds. ``where`` names the data in the one-line :class:`DataError`.
    """
    task_spec(kind)
    y = np.asarray(y)
    if kind == "regression":
        return _regression_targets(y, where)
    if kind == "multilabel":
        return _multilabel(y, where)
    if y.ndim != 1:
        raise DataError(
            f"{where}: labels have shape {y.shape[1:]} per sample but task.kind={kind} needs one "
            f"class per sample (use task=multilabel for 0/1 label vectors)"
        )
    if kind == "binary":
        values = set(np.unique(y).tolist())
        if not values <= {0, 1, False, True}:
            shown = sorted(values, key=str)[:5]
            raise DataError(
                f"{where}: task.kind=binary needs labels 0 and 1, got {shown}; relabel them "
                "or use task=multiclass"
            )
        return y.astype(np.int64), 2
    return y, int(y.max()) + 1 if y.size else 0


def _regression_targets(y: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    if y.ndim not in (1, 2) or not np.issubdtype(y.dtype, np.number):
        raise DataError(
            f"{where}: task.kind=regression needs numeric targets of shape (n,) or (n, k), "
            f"got dtype {y.dtype} shape {y.shape}"
        )
    values = y.astype(np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"{where}: regression targets contain NaN or infinity; clean them")
    return values, 1 if y.ndim == 1 else int(y.shape[1])


def _multilabel(y: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    if y.ndim != 2 or y.shape[1] < 1:
        raise DataError(
            f"{where}: task.kind=multilabel needs a 0/1 label matrix of shape (n, labels), got "
            f"shape {y.shape}; name several label columns (dataset.label_column='a,b,c') or store "
            "a 2-D `y` array in an NPZ file"
        )
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"{where}: task.kind=multilabel needs labels 0 or 1 only")
    return y.astype(np.float32), int(y.shape[1])


def partition_labels(y: np.ndarray, kind: str, *, bins: int = 10) -> np.ndarray:
    """Integer groups for a label-aware partitioner (dirichlet, shards).

    Class ids as they are; a regression target is cut into ``bins`` quantile bins of its
    first column (a label skew on a continuous target means a skew of its range); a
    multi-label row's group is its label set.

    Examples
    --------
    >>> partition_labels(np.array([0.1, 5.0, 2.0, 9.0]), "regression", bins=2).tolist()
    [0, 1, 0, 1]
    """
    if kind == "regression":
        target = y if y.ndim == 1 else y[:, 0]
        edges = np.quantile(target, np.linspace(0, 1, bins + 1)[1:-1])
        return np.searchsorted(edges, target, side="right").astype(np.int64)
    if kind == "multilabel":
        return np.unique(y, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
    return np.asarray(y, dtype=np.int64)


# --------------------------------------------------------------------------- outputs


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z, dtype=np.float32)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    exp = np.exp(z - z.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def serve_outputs(kind: str, raw: np.ndarray, *, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Every served output of ``kind`` from the model's raw ``(batch, outputs)`` array.

    Binary: ``probabilities`` is ``(batch, 1)``, P(class 1); ``predicted_class`` is 1 where it
    reaches ``threshold``. Multilabel: ``predicted_labels`` is ``(batch, K)`` 0/1 int64.
    Regression: ``values`` is the model output unchanged.

    Examples
    --------
    >>> out = serve_outputs("binary", np.array([[2.0], [-1.0]], dtype=np.float32))
    >>> out["predicted_class"].tolist()
    [1, 0]
    """
    raw = np.asarray(raw, dtype=np.float32)
    if kind == "regression":
        return {"values": raw}
    if kind == "multiclass":
        return {
            "logits": raw,
            "probabilities": _softmax(raw),
            "predicted_class": raw.argmax(axis=1).astype(np.int64),
        }
    probs = _sigmoid(raw)
    if kind == "binary":
        return {
            "logits": raw,
            "probabilities": probs,
            "predicted_class": (probs[:, 0] >= threshold).astype(np.int64),
        }
    task_spec(kind)
    return {
        "logits": raw,
        "probabilities": probs,
        "predicted_labels": (probs >= threshold).astype(np.int64),
    }


def output_specs(kind: str, width: int) -> list[dict[str, object]]:
    """OIP metadata of the served outputs (name, datatype, shape with -1 for the batch)."""
    shapes: dict[str, tuple[str, list[int]]] = {
        "logits": ("FP32", [-1, width]),
        "probabilities": ("FP32", [-1, width]),
        "predicted_class": ("INT64", [-1]),
        "predicted_labels": ("INT64", [-1, width]),
        "values": ("FP32", [-1, width]),
    }
    return [
        {"name": name, "datatype": shapes[name][0], "shape": shapes[name][1]}
        for name in task_spec(kind).outputs
    ]


# --------------------------------------------------------------------------- metrics


def compute_metrics(
    kind: str, y_true: np.ndarray, raw: np.ndarray, *, threshold: float = 0.5
) -> dict[str, float]:
    """The metrics of ``kind`` (:class:`TaskSpec`) of raw model outputs against labels.

    A metric that is undefined on these labels (AUC with one class present) is left out.

    Examples
    --------
    >>> compute_metrics("regression", np.array([1.0, 3.0]), np.array([[1.0], [2.0]]))
    {'rmse': 0.7071067811865476, 'mae': 0.5, 'r2': 0.5}
    """
    raw = np.asarray(raw, dtype=np.float64)
    if kind == "regression":
        return _regression_metrics(np.asarray(y_true, dtype=np.float64), raw)
    out = serve_outputs(kind, raw, threshold=threshold)
    if kind == "multiclass":
        y = np.asarray(y_true, dtype=np.int64)
        pred = out["predicted_class"]
        return {"accuracy": float(np.mean(pred == y)), "f1": f1_score(y, pred, average="macro")}
    if kind == "binary":
        y = np.asarray(y_true, dtype=np.int64)
        pred = out["predicted_class"]
        metrics = {"accuracy": float(np.mean(pred == y))}
        auc = auc_score(y, raw[:, 0])
        if auc is not None:
            metrics["auc"] = auc
        metrics["f1"] = f1_score(y, pred, average="binary")
        return metrics
    y = np.asarray(y_true).astype(np.int64)
    pred = out["predicted_labels"]
    metrics = {
        "accuracy": float(np.mean(np.all(pred == y, axis=1))),
        "f1": f1_score(y, pred, average="micro"),
    }
    aucs = [a for j in range(y.shape[1]) if (a := auc_score(y[:, j], raw[:, j])) is not None]
    if aucs:
        metrics["auc"] = float(np.mean(aucs))
    return metrics


def _regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    y = y.reshape(len(y), -1)
    err = pred.reshape(len(pred), -1) - y
    totals = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
    residuals = np.sum(err**2, axis=0)
    # sklearn's r2_score: uniform average over targets; a constant target scores 0
    r2 = np.where(totals > 0, 1.0 - residuals / np.where(totals > 0, totals, 1.0), 0.0)
    return {
        "rmse": float(np.mean(np.sqrt(np.mean(err**2, axis=0)))),  # per target, averaged
        "mae": float(np.mean(np.abs(err))),
        "r2": float(np.mean(r2)),
    }


def auc_score(y: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve of binary labels ``y`` (0/1) ranked by ``score``.

    The Mann-Whitney statistic with average ranks for ties (as ``roc_auc_score``);
    None when only one class is present.
    """
    y = np.asarray(y).reshape(-1).astype(bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    sorted_scores = np.asarray(score, dtype=np.float64)[order]
    ranks = np.empty(len(y), dtype=np.float64)
    # average rank within each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(y)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    rank_sum = float(ranks[y].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def f1_score(y: np.ndarray, pred: np.ndarray, *, average: str) -> float:
    """F1 as ``sklearn.metrics.f1_score(..., average=average, zero_division=0)``.

    ``binary``: of class 1. ``macro``: mean over the classes present in ``y`` or ``pred``.
    ``micro``: over every (sample, label) cell of 0/1 label matrices.
    """
    if average == "micro":
        tp = float(np.sum((pred == 1) & (y == 1)))
        denom = float(np.sum(pred == 1) + np.sum(y == 1))
        return 2 * tp / denom if denom else 0.0
    classes = [1] if average == "binary" else np.union1d(np.unique(y), np.unique(pred)).tolist()
    scores = []
    for cls in classes:
        tp = float(np.sum((pred == cls) & (y == cls)))
        denom = float(np.sum(pred == cls) + np.sum(y == cls))
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0
