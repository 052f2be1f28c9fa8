"""SCAFFOLD on the gateway (Karimireddy et al. 2020): the local control variate and the gradient correction.

The server sends its control variate ``c`` (``control``, float32, one array per parameter) with the
train message. The gateway keeps its own ``c_i`` (``context.state["scaffold-ci"]``, zeros at first),
adds ``c - c_i`` to every local gradient (``train_local(correction=...)``), so each step follows the
fleet's direction rather than its own plant's, and after training replies with ``c_i+ - c_i``
(``control-delta``), where ``c_i+`` is the gradient of its mean loss at the model the round started
from (option I of the paper: it holds for any local optimiser, Adam included). ``c_i+`` replaces
``c_i`` on the gateway.

What leaves the gateway besides the update is a float32 gradient of its own data, as large as the
model: twice the uplink, and no privacy mode covers it, so ``strategy=scaffold`` refuses ``privacy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from iiotfl.clients.training import mean_gradient
from iiotfl.strategies import wire

CONTROL, CONTROL_DELTA = wire.CONTROL, wire.CONTROL_DELTA
STATE = "scaffold-ci"  # the gateway's c_i in its context state


@dataclass
class Control:
    correction: list[torch.Tensor]   # c - c_i, per parameter, added to every local gradient
    delta: dict[str, np.ndarray]     # c_i+ - c_i, per parameter name: what the reply carries


def start(msg: Message, context: Context, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *,
          batch_size: int, loss_fn) -> Control | None:
    """SCAFFOLD's part of this round, when the message carries the server's control variate (else None).
    ``model`` holds the round's starting weights; ``c_i+`` (their mean-loss gradient) replaces ``c_i``."""
    if CONTROL not in msg.content:
        return None
    names = [n for n, _ in model.named_parameters()]
    server = wire.array_record(msg.content, CONTROL)
    if sorted(server.keys()) != sorted(names):
        raise ValueError(f"the server's control variate names {sorted(server.keys())}, this model's parameters "
                         f"are {sorted(names)}")
    c = {k: np.asarray(server[k].numpy(), dtype=np.float32) for k in names}
    held = wire.array_record(context.state, STATE) if STATE in context.state else None
    c_i = {k: (np.asarray(held[k].numpy(), dtype=np.float32) if held is not None and k in held
               else np.zeros_like(c[k])) for k in names}
    for k, p in model.named_parameters():
        if c[k].shape != tuple(p.shape) or not np.all(np.isfinite(c[k])):
            raise ValueError(f"the server's control variate for {k} has shape {c[k].shape} or is not finite")
    grads = mean_gradient(model, x, y, batch_size=batch_size, loss_fn=loss_fn)
    c_new = {k: g.detach().numpy().astype(np.float32) for k, g in zip(names, grads, strict=True)}
    context.state[STATE] = ArrayRecord({k: Array(v) for k, v in c_new.items()})
    return Control(correction=[torch.from_numpy(c[k] - c_i[k]) for k in names],
                   delta={k: c_new[k] - c_i[k] for k in names})


def attach(reply: Message, control: Control | None) -> Message:
    """The reply with ``control-delta`` added, its bytes counted in ``bytes-up``."""
    if control is None or reply.has_error():
        return reply
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in control.delta.items()})
    metrics = dict(wire.metric_record(reply.content, "metrics"))
    metrics[wire.BYTES_UP] = wire.as_int(metrics.get(wire.BYTES_UP, 0)) + record.count_bytes()
    content = RecordDict({k: v for k, v in reply.content.items() if k != "metrics"})
    content[CONTROL_DELTA] = record
    content["metrics"] = MetricRecord(metrics)
    reply.content = content
    return reply
