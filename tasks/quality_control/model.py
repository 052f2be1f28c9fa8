"""A small MLP with one logit per label, and its loss.

Six outputs: machine failure, then TWF, HDF, PWF, OSF, RNF (multi-label: a process can
fail in several modes at once). No BatchNorm, so Opacus DP-SGD trains it as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FailureMLP(nn.Module):
    """features -> hidden -> hidden -> 6 logits (SiLU); ~3.3k parameters at 8 inputs, 48 units."""

    def __init__(self, n_features: int, hidden: int = 48, n_labels: int = 6) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, n_labels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiLabelBCE(nn.Module):
    """Binary cross-entropy with logits, averaged over the labels of a sample, then over the batch.

    ``reduction`` follows torch's criteria: ``"mean"`` (training), ``"sum"``, or ``"none"``
    for one loss per *sample* (shape ``(batch,)``) — what Opacus' ghost clipping asks its
    criterion for; plain ``nn.BCEWithLogitsLoss`` would return (batch, labels) there.
    ``pos_weight`` (one value for all labels, or one per label) weighs positive targets,
    against the imbalance of rare failures.
    """

    pos_weight: torch.Tensor | None  # a buffer (registered in __init__)

    def __init__(self, pos_weight: torch.Tensor | float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction
        if pos_weight is not None:
            pos_weight = torch.as_tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_label = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight, reduction="none")
        per_sample = per_label.mean(dim=1) if per_label.dim() > 1 else per_label
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()
