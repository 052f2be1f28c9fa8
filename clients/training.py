"""Local training on a gateway: plain mini-batch Adam on MSE."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, float]:
    """Train ``model`` in place on (x, y); return mean loss of the last epoch and seconds spent."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss()
    model.train()
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    return {"train_loss": last, "train_time": time.perf_counter() - start}
