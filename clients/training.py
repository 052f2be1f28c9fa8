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


def _anchor(model: nn.Module, mu: float) -> list[torch.Tensor] | None:
    """The weights the round starts from (FedProx's anchor), when ``mu`` > 0."""
    if mu < 0:
        raise ValueError(f"proximal-mu must be >= 0, got {mu}")
    return [p.detach().clone() for p in model.parameters()] if mu > 0 else None


def proximal_pull(model: nn.Module, anchor: list[torch.Tensor] | None, rate: float) -> None:
    """FedProx's proximal term as a step of its own after the optimiser's: w <- w - rate (w - w_start), rate =
    lr x mu. For SGD this is the gradient step of mu/2 ||w - w_start||^2 added to the loss; decoupled (as AdamW's
    weight decay), it keeps its strength under Adam and stays outside DP-SGD's per-sample clipping and noise: it
    depends on no example, so it costs no privacy."""
    if anchor is None:
        return
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), anchor, strict=True):
            p.sub_(p - p0, alpha=rate)


def _shift(model: nn.Module, correction: list[torch.Tensor] | None) -> None:
    """SCAFFOLD's step of its own after the optimiser's: w <- w - (c - c_i), one tensor per parameter."""
    if correction is None:
        return
    with torch.no_grad():
        for p, c in zip(model.parameters(), correction, strict=True):
            p.sub_(c)


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
    proximal_mu: float = 0.0,
    correction: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on (x, y); return mean loss of the last epoch, seconds spent and the number of
    optimiser steps. With ``proximal_mu`` (FedProx) every step is followed by :func:`proximal_pull`;
    ``correction`` (SCAFFOLD's c - c_i in parameter units per step, one tensor per parameter) is subtracted from
    the weights after every optimiser step, decoupled from the optimiser as the pull is."""
    start = time.perf_counter()
    anchor = _anchor(model, proximal_mu)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    opt = optimiser(model.parameters(), optimizer, lr, momentum)
    loss_fn = loss_fn or nn.MSELoss()
    model.train()
    last, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            proximal_pull(model, anchor, lr * proximal_mu)
            _shift(model, correction)
            steps += 1
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    return {"train_loss": last, "train_time": time.perf_counter() - start, "local_steps": steps}


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
    proximal_mu: float = 0.0,
    correction: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """DP-SGD with Opacus: Poisson-sampled batches of expected size ``batch_size``,
    per-sample gradients clipped to ``max_grad_norm``, Gaussian noise of
    ``noise_multiplier x max_grad_norm``. Trains ``model`` in place; returns the loss,
    the time spent and the (sample rate, steps) the accountant must compose. ``proximal_mu`` and
    ``correction`` act as in :func:`train_local`, outside the clipping and noise: they depend on no example."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    start = time.perf_counter()
    anchor = _anchor(model, proximal_mu)  # before Opacus wraps the model (the same parameter tensors)
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
                _shift(model, correction)
                steps += 1
                continue
            loss = loss_fn(private(xb), yb)
            loss.backward()
            opt.step()
            proximal_pull(model, anchor, lr * proximal_mu)  # data-independent: outside the clipping and noise
            _shift(model, correction)
            steps += 1
            total += float(loss.detach()) * len(xb)
            count += len(xb)
        last = total / max(count, 1)
    private.remove_hooks() if hasattr(private, "remove_hooks") else None
    return {"train_loss": last, "train_time": time.perf_counter() - start,
            "sample_rate": 1.0 / len(loader), "steps": steps}
