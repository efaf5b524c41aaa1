"""Inference backends: torch eager, int8 dynamic quantization, ONNX Runtime; optional pruning.

A backend maps a float32 ``(batch, input_dim)`` array to float32 logits
``(batch, num_classes)``. Backends other than ``torch``, and any backend built
from magnitude-pruned weights (:func:`prune_model`), approximate the float
model, so :func:`check_backend` measures them against it (accuracy on a
labelled split when one is given, and argmax agreement) and refuses one that
loses more than a tolerance.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from fedinfer.artifacts import (
    INPUT_NAME,
    OUTPUT_NAME,
    ModelManifest,
    load_torch_model,
    split_onnx_graph,
)
from fedinfer.errors import ConfigError, ServingError

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendCheck",
    "build_backend",
    "check_backend",
    "check_onnx_export",
    "export_onnx",
    "prune_model",
]

BACKEND_NAMES: tuple[str, ...] = ("int8", "onnx", "torch")


class Backend(Protocol):
    """What the server needs from a backend."""

    name: str

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return float32 logits for a float32 ``(batch, input_dim)`` array."""
        ...


class TorchBackend:
    """Eager torch on CPU (or the module's device), under ``inference_mode``."""

    name = "torch"

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return logits for ``x``."""
        if not x.flags.writeable:  # torch.from_numpy warns on read-only buffers
            x = x.copy()
        with torch.inference_mode():
            logits: np.ndarray = self.model(torch.from_numpy(x)).numpy()
        return logits


class Int8Backend(TorchBackend):
    """Linear layers quantized to int8 weights with dynamic activation scales."""

    name = "int8"

    def __init__(self, model: nn.Module) -> None:
        # Every quantized forward pass warns that quantized tensor creation is deprecated
        # (torch 2.13); the op works and is tested. A targeted, process-wide filter: the
        # forward runs in a worker thread, where catch_warnings() would race.
        warnings.filterwarnings(
            "ignore", message=r"torch\.quantize_per_tensor", category=UserWarning
        )
        with warnings.catch_warnings():
            # torch.ao.quantization is deprecated in favour of torchao, which we do not
            # depend on; quantize_dynamic still works in torch 2.13 and is tested here.
            warnings.simplefilter("ignore", DeprecationWarning)
            quantized = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                model.eval(), {nn.Linear}, dtype=torch.qint8
            )
        super().__init__(quantized)


class OnnxBackend:
    """The model exported to ONNX in memory and run by ONNX Runtime on CPU."""

    name = "onnx"

    def __init__(
        self,
        model: nn.Module | None,
        *,
        input_dim: int,
        threads: int | None = None,
        graph: bytes | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # Idle ORT worker threads spin by default, burning the CPU that the server's event
        # loop needs on a small box; sleeping costs microseconds per batch at most.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if graph is None:
            if model is None:
                raise TypeError("OnnxBackend needs a model or an ONNX graph")
            graph = export_onnx(model, input_shape=(input_dim,))
        self.session = ort.InferenceSession(
            graph,
            options,
            providers=["CPUExecutionProvider"],
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return logits for ``x``."""
        out: np.ndarray = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        return out


def export_onnx(
    model: nn.Module,
    *,
    input_dim: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    check: bool = True,
) -> bytes:
    """Export ``model`` to ONNX bytes with a dynamic batch dimension, checked against torch.

    The input is ``(batch, *input_shape)`` (``input_shape`` defaults to ``(input_dim,)``).
    With ``check`` the exported graph is run by ONNX Runtime on random inputs of two batch
    sizes and compared with eager torch (:func:`check_onnx_export`).

    Raises
    ------
    ServingError
        The model cannot be exported, or the exported graph disagrees with torch.
    """
    if input_shape is None:
        if input_dim is None:
            raise TypeError("export_onnx needs input_dim or input_shape")
        input_shape = (input_dim,)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # The TorchScript-based exporter is "legacy" in torch 2.13 but needs no extra
            # package (the dynamo exporter requires onnxscript); the output is checked against
            # torch below. Its tracer also emits TracerWarnings about Python control flow.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(),
                (torch.zeros(2, *input_shape),),
                buffer,  # type: ignore[arg-type]
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types for unsupported code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServingError(
            f"the model cannot be exported to ONNX ({first[:300]}); serve it with --backend torch"
        ) from None
    onnx_bytes = buffer.getvalue()
    if check:
        check_onnx_export(model, onnx_bytes, input_shape=tuple(input_shape))
    return onnx_bytes


def check_onnx_export(
    model: nn.Module,
    onnx_bytes: bytes,
    *,
    input_shape: tuple[int, ...],
    batch_sizes: tuple[int, ...] = (1, 5),
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> float:
    """Run the ONNX graph and eager torch on the same random inputs; return the largest gap.

    The inputs come from the OS CSPRNG-seeded generator (no fixed seed) and span several
    batch sizes, so a batch axis frozen into the graph is caught too.

    Raises
    ------
    ServingError
        ONNX Runtime cannot run the graph, or its logits differ beyond ``atol``/``rtol``.
    """
    import onnxruntime as ort

    rng = np.random.default_rng()
    worst = 0.0
    try:
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        for batch in batch_sizes:
            x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
            with torch.inference_mode():
                expected = model.eval()(torch.from_numpy(x)).numpy()
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            if got.shape != expected.shape or not np.allclose(got, expected, atol=atol, rtol=rtol):
                gap = float(np.abs(got - expected).max()) if got.shape == expected.shape else -1
                raise ServingError(
                    f"the ONNX export disagrees with torch at batch size {batch} (shape "
                    f"{list(got.shape)} vs {list(expected.shape)}, max |diff| {gap:.3g}); "
                    "serve it with --backend torch"
                )
            worst = max(worst, float(np.abs(got - expected).max()))
    except ServingError:
        raise
    except Exception as exc:  # onnxruntime's own error types
        raise ServingError(
            f"ONNX Runtime cannot run the exported model ({str(exc)[:300]}); "
            "serve it with --backend torch"
        ) from None
    return worst


def prune_model(model: nn.Module, amount: float) -> nn.Module:
    """Zero the ``amount`` share of smallest-magnitude weights, globally, in place.

    Global L1 unstructured pruning (``torch.nn.utils.prune``) over the weights of every
    Linear and Conv layer, made permanent, so the result is a plain module of the same
    shape that every backend can export. Biases and normalisation layers are kept.

    Parameters
    ----------
    model : torch.nn.Module
        The float model (modified and returned).
    amount : float
        Share of prunable weights set to zero, in ``[0, 1)``; 0 returns ``model`` untouched.

    Examples
    --------
    >>> m = prune_model(nn.Sequential(nn.Linear(10, 10)), 0.5)
    >>> int((m[0].weight == 0).sum())
    50
    """
    if not 0 <= amount < 1:
        raise ConfigError(f"`--prune-amount` must be in [0, 1) (got {amount})")
    if amount == 0:
        return model
    from torch.nn.utils import prune

    targets = [
        (module, "weight")
        for module in model.modules()
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d)
    ]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for module, param in targets:
        prune.remove(module, param)  # type: ignore[no-untyped-call]
    return model


def build_backend(
    name: str,
    weights: Mapping[str, np.ndarray],
    manifest: ModelManifest,
    *,
    threads: int | None = None,
    prune_amount: float = 0.0,
) -> Backend:
    """Build backend ``name`` (``torch``, ``int8`` or ``onnx``) for verified weights.

    ``prune_amount`` > 0 first zeroes that share of the smallest weights
    (:func:`prune_model`); check the result against the unpruned float model with
    :func:`check_backend`.

    Examples
    --------
    >>> weights, manifest = store.load()  # doctest: +SKIP
    >>> logits = build_backend("onnx", weights, manifest).predict(x)  # doctest: +SKIP
    """
    if name not in BACKEND_NAMES:
        raise ConfigError(f"`--backend` is {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    graph = split_onnx_graph(weights)[1]
    if name == "onnx" and graph is not None and prune_amount == 0:
        # The signed graph is data: served without importing the model's Python code.
        return OnnxBackend(None, input_dim=manifest.input_dim, threads=threads, graph=graph)
    model = prune_model(load_torch_model(weights, manifest), prune_amount)
    if name == "torch":
        return TorchBackend(model)
    if name == "int8":
        return Int8Backend(model)
    return OnnxBackend(model, input_dim=manifest.input_dim, threads=threads)


@dataclass(frozen=True)
class BackendCheck:
    """How a backend compares with the float (torch) model on the same inputs."""

    backend: str
    samples: int
    agreement: float
    """Share of samples with the same predicted class as the float model."""
    max_abs_logit_diff: float
    float_accuracy: float | None
    """None when no labels were given."""
    accuracy: float | None

    @property
    def accuracy_drop(self) -> float:
        """Float accuracy minus backend accuracy (or disagreement rate without labels)."""
        if self.float_accuracy is None or self.accuracy is None:
            return 1.0 - self.agreement
        return self.float_accuracy - self.accuracy


def check_backend(
    backend: Backend,
    reference: Backend,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    max_accuracy_drop: float = 0.01,
    task: str = "multiclass",
    threshold: float = 0.5,
) -> BackendCheck:
    """Compare ``backend`` with the float ``reference``; raise if it loses too much.

    Parameters
    ----------
    backend, reference : Backend
        The candidate and the float torch backend of the same weights.
    x : np.ndarray
        float32 ``(n, input_dim)`` samples (a labelled validation split when available).
    y : np.ndarray or None
        Labels of ``x`` (:mod:`fedinfer.tasks`); without them the drop is the disagreement
        rate.
    max_accuracy_drop : float
        Largest tolerated drop (default: 0.01, one percentage point). Regression: the
        largest relative RMSE increase (0.01: 1 %), or without labels the largest share
        of outputs off by more than 1 % of the float outputs' spread.
    task : str
        ``task.kind`` of the model: what "predicted the same" means (default: multiclass).
    threshold : float
        Decision threshold of binary and multi-label models (default: 0.5).

    Raises
    ------
    ServingError
        The backend's drop exceeds ``max_accuracy_drop``.
    """
    from fedinfer.tasks import compute_metrics, serve_outputs

    ours, ref = backend.predict(x), reference.predict(x)
    if task == "regression":
        tolerance = 0.01 * float(np.std(ref)) + 1e-6
        close = np.all(np.abs(ours - ref).reshape(len(x), -1) <= tolerance, axis=1)
        float_acc = acc = None
        if y is not None:  # "accuracy" of a regression model: 1 - relative RMSE increase
            ref_rmse = compute_metrics(task, y, ref)["rmse"]
            our_rmse = compute_metrics(task, y, ours)["rmse"]
            float_acc, acc = 1.0, 1.0 - (our_rmse - ref_rmse) / max(ref_rmse, 1e-12)
        agreement = float(close.mean())
    else:
        name = "predicted_labels" if task == "multilabel" else "predicted_class"
        pred = serve_outputs(task, ours, threshold=threshold)[name].reshape(len(x), -1)
        ref_pred = serve_outputs(task, ref, threshold=threshold)[name].reshape(len(x), -1)
        agreement = float(np.all(pred == ref_pred, axis=1).mean())
        float_acc = acc = None
        if y is not None:
            labels = np.asarray(y).reshape(len(x), -1)
            float_acc = float(np.all(ref_pred == labels, axis=1).mean())
            acc = float(np.all(pred == labels, axis=1).mean())
    check = BackendCheck(
        backend=backend.name,
        samples=len(x),
        agreement=agreement,
        max_abs_logit_diff=float(np.abs(ours - ref).max()),
        float_accuracy=float_acc,
        accuracy=acc,
    )
    if check.accuracy_drop > max_accuracy_drop:
        what = "of its RMSE" if task == "regression" else "accuracy"
        raise ServingError(
            f"backend {backend.name!r} loses {check.accuracy_drop:.2%} {what} against the float "
            f"model on {check.samples} samples (tolerance {max_accuracy_drop:.2%}); use "
            "--backend torch, lower --prune-amount, or raise --max-accuracy-drop"
        )
    return check
