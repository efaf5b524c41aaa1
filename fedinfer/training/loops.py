"""Local training and evaluation loops run at each site."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedinfer.data import LazyDataset, worker_count
from fedinfer.data.datasets import ArrayDataset

__all__ = [
    "EvalResult",
    "TrainResult",
    "evaluate",
    "get_weights",
    "make_loader",
    "proximal_step_fn",
    "set_weights",
    "train_epochs",
]


@dataclass(frozen=True)
class TrainResult:
    """What one site's local training did."""

    loss: float
    accuracy: float
    steps: int
    num_examples: int


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on one split."""

    loss: float
    accuracy: float
    num_examples: int


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
) -> TrainResult:
    """Run ``epochs`` passes of SGD over ``loader``.

    ``after_step`` runs after every optimizer step (the FedProx proximal step).
    With ``skip_empty`` an empty batch is skipped; DP-SGD passes False, because whether
    a Poisson batch is empty depends on the data, so its noise-only step must still be
    taken (and charged) exactly as the accountant assumes.
    """
    criterion = nn.CrossEntropyLoss()
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
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    return TrainResult(
        loss=total_loss / max(seen, 1),
        accuracy=correct / max(seen, 1),
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
    model: nn.Module, data: ArrayDataset, *, device: torch.device, batch_size: int = 1024
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    if len(data) == 0:
        return EvalResult(loss=0.0, accuracy=0.0, num_examples=0)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(data.y[start : start + batch_size]).to(device)
        logits = model(x)
        total_loss += float(criterion(logits, y))
        correct += int((logits.argmax(1) == y).sum())
    return EvalResult(
        loss=total_loss / len(data), accuracy=correct / len(data), num_examples=len(data)
    )
