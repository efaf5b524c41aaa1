"""Local training and evaluation loops run at each site."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedinfer.data import LazyDataset, worker_count
from fedinfer.data.datasets import ArrayDataset
from fedinfer.errors import ConfigError
from fedinfer.tasks import TASK_KINDS, compute_metrics

__all__ = [
    "EvalResult",
    "TrainResult",
    "evaluate",
    "get_weights",
    "loss_fn",
    "make_loader",
    "proximal_step_fn",
    "set_weights",
    "train_epochs",
]


@dataclass(frozen=True)
class TrainResult:
    """What one site's local training did."""

    loss: float
    accuracy: float | None
    """Share of training samples predicted right (None: regression)."""
    steps: int
    num_examples: int


@dataclass(frozen=True)
class EvalResult:
    """Loss and the task's metrics (:mod:`fedinfer.tasks`) of a model on one split."""

    loss: float
    accuracy: float | None
    """The ``accuracy`` metric (None: regression)."""
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    """Every metric of the task, e.g. ``{"rmse": .., "mae": .., "r2": ..}``."""


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_fn(task: str = "multiclass", *, reduction: str = "mean") -> Loss:
    """The loss of ``task`` on ``(model output, labels)`` (table in :mod:`fedinfer.tasks`).

    Examples
    --------
    >>> loss = loss_fn("regression")
    >>> float(loss(torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 1.0])))
    2.0
    """
    if task == "multiclass":
        return nn.CrossEntropyLoss(reduction=reduction)
    if task in ("binary", "multilabel"):
        bce = nn.BCEWithLogitsLoss(reduction=reduction)
        return lambda out, y: bce(out.reshape(len(y), -1), y.reshape(len(y), -1).to(out.dtype))
    if task == "regression":
        mse = nn.MSELoss(reduction=reduction)
        return lambda out, y: mse(out.reshape(len(y), -1), y.reshape(len(y), -1).to(out.dtype))
    raise ConfigError(f"`task.kind` is {task!r}; choose one of {', '.join(TASK_KINDS)}")


def _correct(task: str, out: torch.Tensor, y: torch.Tensor, threshold: float) -> int:
    """Samples predicted exactly right (all labels right for multilabel)."""
    if task == "multiclass":
        return int((out.argmax(1) == y).sum())
    logit = math.log(threshold / (1 - threshold))  # sigmoid(z) >= t  <=>  z >= logit(t)
    pred = (out.reshape(len(y), -1) >= logit).to(y.dtype)
    return int((pred == y.reshape(len(y), -1)).all(dim=1).sum())


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state as float32 numpy arrays, keyed by parameter name."""
    return {k: v.detach().cpu().numpy().copy() for k, v in _plain_state(model).items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load numpy weights into ``model`` (names must match exactly)."""
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}
    target = getattr(model, "_module", model)  # Opacus GradSampleModule wraps the model
    target.load_state_dict(state, strict=True)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    target = getattr(model, "_module", model)
    return dict(target.state_dict())


def make_loader(
    data: ArrayDataset | LazyDataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
) -> DataLoader[tuple[torch.Tensor, ...]]:
    """A DataLoader with a seeded shuffle over in-memory arrays or a lazy on-disk dataset.

    ``num_workers`` processes read a :class:`~fedinfer.data.lazy.LazyDataset`'s samples
    (default: 0, read in this process; capped at the machine's cores); in-memory arrays
    need none.
    """
    generator = torch.Generator().manual_seed(seed)
    if isinstance(data, LazyDataset):
        workers = worker_count(num_workers)
        return DataLoader(
            data,  # type: ignore[arg-type]  # a map-style dataset without torch's base class
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def train_epochs(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    device: torch.device,
    after_step: Callable[[], None] | None = None,
    skip_empty: bool = True,
    task: str = "multiclass",
    threshold: float = 0.5,
) -> TrainResult:
    """Run ``epochs`` passes of SGD over ``loader`` with the loss of ``task``.

    ``after_step`` runs after every optimizer step (the FedProx proximal step).
    With ``skip_empty`` an empty batch is skipped; DP-SGD passes False, because whether
    a Poisson batch is empty depends on the data, so its noise-only step must still be
    taken (and charged) exactly as the accountant assumes.
    """
    criterion = loss_fn(task)
    model.train()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for _ in range(epochs):
        for x, y in loader:
            if len(y) == 0 and skip_empty:
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = criterion(logits, y) if len(y) else logits.sum() * 0.0
            loss.backward()
            optimizer.step()
            steps += 1
            if after_step is not None:
                after_step()
            total_loss += float(loss.detach()) * len(y)
            if task != "regression" and len(y):
                correct += _correct(task, logits.detach(), y, threshold)
            seen += len(y)
    return TrainResult(
        loss=total_loss / max(seen, 1),
        accuracy=None if task == "regression" else correct / max(seen, 1),
        steps=steps,
        num_examples=seen,
    )


def proximal_step_fn(
    model: nn.Module, global_params: list[torch.Tensor], *, mu: float, lr: float
) -> Callable[[], None]:
    """FedProx's proximal term as a decoupled step: ``w -= lr * mu * (w - w_global)``.

    Applied after each optimizer step instead of being added to the loss, so it is
    also applied under DP-SGD: Opacus builds the update from per-sample gradients
    only and would silently drop a loss term that does not depend on the data. The
    proximal term does not touch the data, so applying it costs no privacy.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def step() -> None:
        for p, g in zip(params, global_params, strict=True):
            p.sub_(lr * mu * (p - g))

    return step


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    *,
    device: torch.device,
    batch_size: int = 1024,
    task: str = "multiclass",
    threshold: float = 0.5,
) -> EvalResult:
    """Mean loss and every metric of ``task`` of ``model`` on ``data``.

    Examples
    --------
    >>> result = evaluate(model, site.test, device=torch.device("cpu"), task="regression")
    ... # doctest: +SKIP
    >>> sorted(result.metrics)  # doctest: +SKIP
    ['mae', 'r2', 'rmse']
    """
    if len(data) == 0:
        return EvalResult(loss=0.0, accuracy=None if task == "regression" else 0.0, num_examples=0)
    model.eval()
    criterion = loss_fn(task, reduction="sum")
    total_loss, outputs = 0.0, []
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(data.y[start : start + batch_size]).to(device)
        out = model(x)
        loss = float(criterion(out, y))
        # BCE and MSE sum over every output: per sample, as cross-entropy is
        total_loss += loss if task == "multiclass" else loss / max(out.shape[1], 1)
        outputs.append(out.float().cpu().numpy())
    metrics = compute_metrics(task, data.y, np.concatenate(outputs), threshold=threshold)
    return EvalResult(
        loss=total_loss / len(data),
        accuracy=metrics.get("accuracy"),
        num_examples=len(data),
        metrics=metrics,
    )
