"""SCAFFOLD on the gateway (Karimireddy et al. 2020, option II): the local control variate and the drift correction.

The server sends its control variate ``c`` (``control``, float32, one array per parameter) with the
train message. The gateway keeps its own ``c_i`` (``context.state["scaffold-ci"]``, zeros at first).
Both are in parameter units per local step: ``c_i`` is how far, on average, one of this gateway's own
steps moved each weight in its last round, ``c`` the fleet's mean of that. After every optimiser step
the gateway moves its weights by ``-(c - c_i)`` (``train_local(correction=...)``), so its path follows
the fleet's direction rather than its own plant's. After training it replies with
``c_i+ - c_i = (x - y_i) / K - c`` (``control-delta``), where ``x`` is the round's model, ``y_i`` its
trained one and ``K`` its number of steps: option II of the paper, the path's own mean step with the
correction taken out. ``c_i+`` replaces ``c_i`` on the gateway.

Option II rather than option I (the mean-loss gradient at the round's model) because the correction is
applied in parameter space, outside the optimiser: the same for Adam and SGD, with no extra pass over the
data, and consistent with the path the gateway actually took. Option I, added to Adam's gradients, drove
predictive maintenance's model away in flat directions, where Adam turns a small constant gradient into a
full step every step.

What leaves the gateway besides the update is ``control-delta``, as large as the model: twice the uplink. It is
the trained model's exact float32 update over K less c, so it tells the server nothing beyond that update; under
``privacy=sample`` the trained model is DP-SGD's output and ``control-delta`` post-processing of it (no ε).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from iiotfl.strategies import wire

CONTROL, CONTROL_DELTA = wire.CONTROL, wire.CONTROL_DELTA
STATE = "scaffold-ci"  # the gateway's c_i in its context state


@dataclass
class Control:
    correction: list[torch.Tensor]   # c - c_i, per parameter: subtracted from the weights after every step
    server: dict[str, np.ndarray]    # c, per parameter name
    held: dict[str, np.ndarray]      # c_i, per parameter name
    start: dict[str, np.ndarray]     # x: the round's model, per parameter name
    delta: dict[str, np.ndarray] | None = None  # c_i+ - c_i, once trained: what the reply carries


def start(msg: Message, context: Context, model: torch.nn.Module) -> Control | None:
    """SCAFFOLD's part of this round, when the message carries the server's control variate (else None).
    ``model`` holds the round's starting weights."""
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
    return Control(correction=[torch.from_numpy(c[k] - c_i[k]) for k in names], server=c, held=c_i,
                   start={k: p.detach().numpy().copy() for k, p in model.named_parameters()})


def finish(control: Control | None, context: Context, model: torch.nn.Module, steps: int) -> None:
    """After ``steps`` local steps: c_i+ - c_i = (x - y_i) / K - c into ``control.delta``; c_i+ into the state."""
    if control is None:
        return
    k_steps = max(int(steps), 1)
    trained = {k: p.detach().numpy() for k, p in model.named_parameters()}
    control.delta = {k: ((control.start[k] - trained[k]) / k_steps - control.server[k]).astype(np.float32)
                     for k in control.start}
    context.state[STATE] = ArrayRecord({k: Array(np.ascontiguousarray(control.held[k] + d))
                                        for k, d in control.delta.items()})


def attach(reply: Message, control: Control | None) -> Message:
    """The reply with ``control-delta`` added, its bytes counted in ``bytes-up``."""
    if control is None or control.delta is None or reply.has_error():
        return reply
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in control.delta.items()})
    metrics = dict(wire.metric_record(reply.content, "metrics"))
    metrics[wire.BYTES_UP] = wire.as_int(metrics.get(wire.BYTES_UP, 0)) + record.count_bytes()
    content = RecordDict({k: v for k, v in reply.content.items() if k != "metrics"})
    content[CONTROL_DELTA] = record
    content["metrics"] = MetricRecord(metrics)
    reply.content = content
    return reply
