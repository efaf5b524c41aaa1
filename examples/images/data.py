"""A site's data function for ``dataset=function`` / ``fedinfer site --data py:...``.

``load_site(site_id="site-01", split="train")`` returns an indexable torch Dataset of
``(1, 8, 8)`` digit images and integer labels; a real one would open the site's own files
or database here. A site imports it only if ``$FEDINFER_DATA_TARGETS`` names it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

_SPLITS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}


class DigitImages(Dataset[tuple[torch.Tensor, int]]):
    """Digit images ``(1, 8, 8)`` in [0, 1]; ``targets`` lets fedinfer read labels unread."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(images.astype(np.float32))
        self.targets = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


def load_site(site_id: str, split: str, num_sites: int = 4) -> DigitImages:
    """Site ``site-0k``'s share of scikit-learn's bundled digits (every ``num_sites``-th image)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    k = int(site_id.rsplit("-", 1)[1]) % num_sites
    images = (digits.data[k::num_sites] / 16.0).reshape(-1, 1, 8, 8)
    labels = digits.target[k::num_sites]
    lo, hi = (int(f * len(labels)) for f in _SPLITS[split])
    return DigitImages(images[lo:hi], labels[lo:hi])
