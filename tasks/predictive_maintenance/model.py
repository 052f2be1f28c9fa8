"""A small 1D-CNN a gateway can train: RUL from a window of sensor readings.

No BatchNorm (DP-SGD needs per-sample gradients that BatchNorm mixes); about 52k
parameters for 14 sensors and a 30-cycle window. The output is RUL / rul_cap.
"""

from __future__ import annotations

import torch
from torch import nn


class RulCNN(nn.Module):
    def __init__(self, n_sensors: int = 14, window: int = 30, channels: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(n_sensors, channels, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AvgPool1d(kernel_size=2, ceil_mode=True),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * ((window + 1) // 2), hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, window, sensors) -> (batch,) RUL / rul_cap."""
        return self.head(self.features(x.transpose(1, 2))).squeeze(-1)
