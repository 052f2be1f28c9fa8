"""Update inversion (DLG / iDLG style): what the server could rebuild from an update it sees.

Plain FedAvg shows the server each gateway's update. If a gateway took one SGD step on
one window, that update is ``-lr x gradient`` of one record, and the record can be
recovered by searching for an input (and label) whose gradient matches it (Zhu et al.,
"Deep Leakage from Gradients", 2019; the label first, analytically, as in iDLG:
for squared error the output bias gradient is ``2 (prediction - label)``).

:func:`invert` runs that search; :func:`closeness` says how close a reconstruction is
to the true window (relative L2 error, correlation). Against the aggregate of a fleet
(many records, many gateways, averaged) the same search finds nothing close.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import nn


def sgd_update(model: nn.Module, x: np.ndarray, y: np.ndarray, lr: float) -> list[torch.Tensor]:
    """The update one plain SGD step on ``(x, y)`` makes: new weights - old weights."""
    params = [p for p in model.parameters()]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=lr)
    opt.zero_grad()
    nn.functional.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    opt.step()
    update = [p.detach() - b for p, b in zip(params, before)]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return update


def invert(model: nn.Module, update: list[torch.Tensor], lr: float, shape: tuple[int, ...], steps: int = 400,
           seed: int = 0) -> tuple[np.ndarray, float]:
    """Search for one window whose SGD update matches ``update``; returns (window, label)."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters()]
    target = [-u / lr for u in update]
    x_hat = torch.randn((1, *shape), requires_grad=True)
    opt = torch.optim.Adam([x_hat], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bias_grad = target[-1].reshape(-1)[0]  # d loss / d output bias = 2 (pred - y)

    def label(pred: torch.Tensor) -> torch.Tensor:
        return (pred.detach() - bias_grad / 2).reshape(pred.shape)

    for _ in range(steps):
        opt.zero_grad()
        pred = model(x_hat)
        grads = torch.autograd.grad(nn.functional.mse_loss(pred, label(pred)), params, create_graph=True)
        dist = cast(torch.Tensor, sum(1 - nn.functional.cosine_similarity(g.reshape(-1), t.reshape(-1), dim=0)
                                      for g, t in zip(grads, target)))  # a model has parameters: never sum's 0
        dist.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        pred = model(x_hat)
        y_hat = float(label(pred).reshape(-1)[0])
    return x_hat.detach().numpy()[0], y_hat


def closeness(true: np.ndarray, guess: np.ndarray) -> dict[str, float]:
    t, g = true.ravel(), guess.ravel()
    return {"relative_error": float(np.linalg.norm(g - t) / np.linalg.norm(t)),
            "correlation": float(np.corrcoef(t, g)[0, 1])}
