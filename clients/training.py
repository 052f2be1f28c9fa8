"""Local training on a gateway: mini-batch Adam (or SGD with momentum, ``train.optimizer``) on the task's loss
(MSE unless it says otherwise)."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

OPTIMIZERS = ("adam", "sgd")


def optimiser(params, name: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    """``adam``: the default. ``sgd``: SGD with momentum, whose update follows the gradient's magnitudes (a few
    weights move far, most little), where Adam moves every weight by about the same step; sparse codecs keep
    more of the former (docs/links-and-codecs.md)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name != "adam":
        raise ValueError(f"train.optimizer={name!r}; pick one of {list(OPTIMIZERS)}")
    return torch.optim.Adam(params, lr=lr)


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    loss_fn: nn.Module | None = None,
    optimizer: str = "adam",
    momentum: float = 0.0,
) -> dict[str, float]:
    """Train ``model`` in place on (x, y); return mean loss of the last epoch and seconds spent."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    opt = optimiser(model.parameters(), optimizer, lr, momentum)
    loss_fn = loss_fn or nn.MSELoss()
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


def train_local_dp(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    noise_multiplier: float,
    max_grad_norm: float,
    loss_fn: nn.Module | None = None,
    optimizer: str = "adam",
    momentum: float = 0.0,
) -> dict[str, float]:
    """DP-SGD with Opacus: Poisson-sampled batches of expected size ``batch_size``,
    per-sample gradients clipped to ``max_grad_norm``, Gaussian noise of
    ``noise_multiplier x max_grad_norm``. Trains ``model`` in place; returns the loss,
    the time spent and the (sample rate, steps) the accountant must compose."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen)
    opt = optimiser(model.parameters(), optimizer, lr, momentum)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    # ghost clipping: per-sample gradient norms without materialising per-sample gradients
    # (same clipping and noise as the hooks mode, ~1.5x faster on this model)
    private, opt, loss_fn, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True, noise_generator=gen,
        grad_sample_mode="ghost", criterion=loss_fn or nn.MSELoss(),
    )
    private.train()
    steps, last = 0, 0.0
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            opt.zero_grad()
            if len(xb) == 0:  # an empty Poisson batch is still a step the accountant counts
                opt.step()
                steps += 1
                continue
            loss = loss_fn(private(xb), yb)
            loss.backward()
            opt.step()
            steps += 1
            total += float(loss.detach()) * len(xb)
            count += len(xb)
        last = total / max(count, 1)
    private.remove_hooks() if hasattr(private, "remove_hooks") else None
    return {"train_loss": last, "train_time": time.perf_counter() - start,
            "sample_rate": 1.0 / len(loader), "steps": steps}
