"""A small CNN for ``(1, 8, 8)`` digit images, with BatchNorm on purpose.

BatchNorm mixes the samples of a batch, which DP-SGD forbids; with
``privacy.fix_model=true`` fedinfer replaces it by GroupNorm (Opacus
``ModuleValidator.fix``) and reports the replacement.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsCnn(nn.Module):
    """Two 3x3 convolutions with BatchNorm, 2x2 pooling, and a linear head."""

    def __init__(
        self, *, input_shape: tuple[int, ...], num_classes: int, channels: int = 16
    ) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels * (height // 2) * (width // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for a ``(batch, C, H, W)`` float tensor."""
        logits: torch.Tensor = self.head(self.features(x).flatten(1))
        return logits
