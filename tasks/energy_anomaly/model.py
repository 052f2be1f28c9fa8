"""A small MLP a gateway can train: the monitored quantity from a window of inputs.

Flattened window (``window`` steps x ``n_features``) -> two hidden layers of ``hidden``
units (tanh: smooth power curves and load profiles) -> one output. About 1.5k parameters
for 4 features, a 3-step window and 32 units. No BatchNorm (DP-SGD needs per-sample
gradients). Trained on normal operation only; the absolute residual is the anomaly score.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLP(nn.Module):
    def __init__(self, n_features: int, window: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_features * window, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, window, features) -> (batch,) normalised prediction of the target."""
        return self.net(x).squeeze(-1)
