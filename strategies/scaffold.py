"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", 2020):
control variates that correct each gateway's local drift towards its own plant.

The server keeps ``c``, a control variate as large as the model's parameters (zeros at first), and
sends it with every train message (``control``). Each gateway moves its weights by ``-(c - c_i)`` after
every local step and replies with its update and ``c_i+ - c_i`` (``control-delta``; option II of the
paper in parameter units per step, ``clients/scaffold.py``). The
server applies the updates as FedAvg does (CodecFedAvg: codecs and the delta downlink as usual; the
control travels in float32) and moves ``c`` by the mean control change times the share of the fleet
that answered: c += |S| / N × mean(c_i+ - c_i).

Costs and limits: the downlink and the uplink each carry one more float32 vector the size of the
parameters. ``control-delta`` = (x - y_i) / K - c is a function of the gateway's trained model, K (its step
count, fixed by its example count and batch size) and c: the exact float32 update, whatever the codec, and
nothing beyond it. Under ``privacy=sample`` the trained model is DP-SGD's output, so the control change is
post-processing and costs no ε; the correction is a data-independent step outside the clipping and noise.
``privacy=client`` is refused: its path builds Flower's FedAvg inside the DP wrappers, which would carry
no control. A reply without a valid control change is left out like a malformed update. The control
variate is not in the checkpoint, so a run does not resume after a SuperLink restart.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from iiotfl.strategies import wire
from iiotfl.strategies.codec_fedavg import CodecFedAvg
from iiotfl.strategies.spec import BuildContext, StrategySpec, refuse_client_dp


class CodecScaffold(CodecFedAvg):
    """CodecFedAvg with SCAFFOLD's server control variate."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.control: dict[str, np.ndarray] | None = None  # c, per parameter name
        self.population = 1  # N: the gateways connected when the round was sampled

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.population = max(1, len(list(grid.get_node_ids())))
        if self.control is None:
            self.control = {k: np.zeros(v.numpy().shape, np.float32) for k, v in arrays.items()
                            if k in self.parameter_names(arrays)}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        record = ArrayRecord({k: Array(v) for k, v in self.control.items()})
        for msg in messages:
            msg.content[wire.CONTROL] = record
        return messages

    @staticmethod
    def parameter_names(arrays: ArrayRecord) -> list[str]:
        """The trainable entries: floating-point arrays that are not normalisation statistics."""
        return [k for k, v in arrays.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                and np.issubdtype(np.dtype(v.dtype), np.floating)]

    def control_delta(self, msg: Message) -> dict[str, np.ndarray]:
        """A reply's ``control-delta``, checked against ``c``; ValueError when missing or malformed."""
        assert self.control is not None
        if wire.CONTROL_DELTA not in msg.content:
            raise ValueError("no control-delta (a gateway without SCAFFOLD?)")
        rec = wire.array_record(msg.content, wire.CONTROL_DELTA)
        if sorted(rec.keys()) != sorted(self.control):
            raise ValueError(f"control-delta names {sorted(rec.keys())[:4]}..., expected the model's parameters")
        out = {}
        for k, c in self.control.items():
            try:
                v = np.asarray(rec[k].numpy(), dtype=np.float32)
            except (TypeError, OSError) as err:
                raise ValueError(f"control-delta {k!r} cannot be read: {err}") from None
            if v.shape != c.shape or not np.all(np.isfinite(v)):
                raise ValueError(f"control-delta {k!r} has shape {v.shape} (expected {c.shape}) or is not finite")
            out[k] = v
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        good, deltas, bad = [], [], {}
        for msg in replies:
            if msg.has_error() or self.control is None or wire.UPDATE not in msg.content:
                good.append(msg)  # an error or no update: CodecFedAvg's decoding says what it is
                continue
            try:
                deltas.append(self.control_delta(msg))
                good.append(msg)
            except (KeyError, ValueError, wire.RecordKindError) as err:
                node = msg.metadata.src_node_id
                log(WARNING, "gateway %d: malformed SCAFFOLD control, left out of round %d: %s", node, server_round,
                    err)
                bad[node] = f"malformed update, left out: {err}"
        arrays, metrics = super().aggregate_train(server_round, good)
        self.rejected.update(bad)
        if arrays is not None and deltas and self.control is not None:
            share = len(deltas) / max(self.population, len(deltas))
            for k in self.control:
                self.control[k] = (self.control[k] + share * np.mean([d[k] for d in deltas], axis=0)).astype(np.float32)
        return arrays, metrics


def _validate(cfg: Mapping[str, Any]) -> None:
    refuse_client_dp(cfg, "Flower's DP wrappers build their own FedAvg, which sends no control variate")


def build(cfg: Mapping[str, Any], ctx: BuildContext) -> CodecScaffold:  # noqa: ARG001
    return CodecScaffold(**ctx.common)


SPEC = StrategySpec(
    name="scaffold", build=build, validate=_validate, uplink="plaintext", client_dp=None,
    describe="the codec's encoding of the update and a float32 control-variate change (the gateway's mean step "
             "this round less c: the exact update, whatever the codec); the server sees both",
    resume_refusal="the SCAFFOLD control variate is not in the checkpoint; start the run again",
    also_sent="a float32 control change: the exact update over its step count, less the server's control variate "
              "(nothing beyond the update)",
)
