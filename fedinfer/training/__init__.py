"""Local training: loops, FedProx's proximal step, device selection."""

from fedinfer.training.device import select_device
from fedinfer.training.loops import (
    EvalResult,
    TrainResult,
    evaluate,
    get_weights,
    make_loader,
    proximal_step_fn,
    set_weights,
    train_epochs,
)

__all__ = [
    "EvalResult",
    "TrainResult",
    "evaluate",
    "get_weights",
    "make_loader",
    "proximal_step_fn",
    "select_device",
    "set_weights",
    "train_epochs",
]
