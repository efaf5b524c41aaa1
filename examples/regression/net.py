"""A small tabular regression network: an ordinary PyTorch module, nothing fedinfer-specific."""

from __future__ import annotations

import torch
from torch import nn


class TabularRegressor(nn.Module):
    """A linear part plus a small ReLU MLP: ``y = W x + MLP(x)``, one output per target.

    fedinfer passes ``input_shape`` (the features, e.g. ``(10,)``) and ``num_classes`` (the
    output width: 1 for one regression target) because the constructor names them.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int = 1, hidden: int = 16
    ) -> None:
        super().__init__()
        features = int(torch.tensor(input_shape).prod())
        self.linear = nn.Linear(features, num_classes)
        self.mlp = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted targets ``(batch, num_classes)`` for a ``(batch, features)`` batch."""
        x = x.flatten(1)
        out: torch.Tensor = self.linear(x) + self.mlp(x)
        return out
