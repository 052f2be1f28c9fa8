"""FedAvg over constrained links: encoded updates, delta downlink, over-selection.

Contract with the ClientApp (``clients/app.py``):

* **Down** (``train`` message). Either ``arrays`` — the full model the gateway should
  start from, float32 — or ``delta`` — the change since the model the gateway got last
  round, encoded with the codec, plus ``config["base-round"]``, the round of that model.
  A gateway only gets a delta if it answered the previous round (so it holds the
  base); everyone else gets the full model. In the first round of a fresh run with the
  delta downlink, gateways get no model at all but ``config["seeded-start"]``, the digest
  of the task's seeded initial model: each builds it (``task.build_model``) and checks it.
  Server and gateways reconstruct the same ``view`` (base + decoded delta) bit for bit, so a
  lossy downlink never drifts apart: what it left out is in the next round's delta.
* **Up** (reply). ``update``: the gateway's new weights minus the view it started from,
  encoded with the codec (after any privacy noise), and ``metrics`` with
  ``num-examples``. The server decodes, adds the view back and hands the weights to
  Flower's FedAvg (weighted average), or to Flower's Krum / FedMedian / FedTrimmedAvg
  (``robust.py``: the same decoding in front of another Flower strategy).
* **Who trains.** ``clients_per_round`` gateways are needed (``null``: fraction_train of
  those connected); ``over_selection`` samples that many more; the round's grid keeps
  the first replies (see ``server/rounds.py``) and the rest are late.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any, Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from iiotfl.compat.flower import message_with_metadata
from iiotfl.configs import no_checks
from iiotfl.strategies import wire
from iiotfl.strategies.codecs import DOWNLINKS, Codec, flatten, unflatten, weights_digest
from iiotfl.strategies.spec import BuildContext, StrategySpec

RAW = "raw-bytes"  # an Array's serialisation type for a byte stream sent as it is (no numpy header)


def _array(v: np.ndarray) -> Array:
    """A codec's byte stream (1-D uint8) travels as its raw bytes; other arrays as numpy arrays."""
    if v.dtype == np.uint8 and v.ndim == 1:
        return Array(dtype="uint8", shape=(int(v.size),), stype=RAW, data=v.tobytes())
    return Array(np.ascontiguousarray(v))


def encoded_record(enc: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: _array(v) for k, v in enc.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record; ValueError for one whose serialisation this project does not send."""
    out = {}
    for k, v in record.items():
        if v.stype == RAW:
            out[k] = np.frombuffer(v.data, dtype=np.uint8)
        else:
            try:
                out[k] = v.numpy()
            except (TypeError, OSError) as err:  # another serialisation, or not a numpy array
                raise ValueError(f"array {k!r} cannot be read: {err}") from None
    return out


class CodecFedAvg(FedAvg):
    """Flower's FedAvg with update codecs, a delta-encoded downlink and over-selection."""

    def __init__(
        self,
        *,
        codec: Codec,
        downlink: str = "full",
        clients_per_round: int | None = None,
        over_selection: float = 0.0,
        seed: int = 0,
        on_sampled: Callable[[int, list[int], int], None] | None = None,
        max_update_norm: float | None = None,
        **fedavg: Any,
    ) -> None:
        super().__init__(**fedavg)
        self.max_update_norm = max_update_norm
        self.rejected: dict[int, str] = {}  # node -> why its update was left out of the last round
        if downlink not in DOWNLINKS:
            raise ValueError(f"codec.downlink must be full or delta, got {downlink!r}")
        self.codec = codec
        self.downlink = downlink
        self.clients_per_round = clients_per_round
        self.over_selection = over_selection
        self.rng = random.Random(seed)
        self.down_rng = np.random.default_rng(seed)
        self.on_sampled = on_sampled
        self.view: dict[str, np.ndarray] | None = None  # the model every up-to-date gateway holds
        self.view_round = 0
        self.current: set[int] = set()  # gateways that answered the last round
        # the digest of the task's seeded initial model when the run starts from it (not a resumed run): with the
        # delta downlink the first round sends this instead of the model, and each gateway builds it itself
        self.seeded_start: str | None = None
        self.sent_round = 0

    # -- who trains --------------------------------------------------------------------
    def needed(self, connected: int) -> int:
        if self.clients_per_round:
            return min(int(self.clients_per_round), connected)
        return max(self.min_train_nodes, int(connected * self.fraction_train))

    def sample(self, grid: Grid) -> tuple[list[int], int]:
        while len(nodes := sorted(grid.get_node_ids())) < max(self.min_available_nodes, 1):
            log(INFO, "Waiting for gateways: %d connected (need %d)", len(nodes), self.min_available_nodes)
            time.sleep(1)
        need = self.needed(len(nodes))
        size = min(len(nodes), math.ceil(need * (1.0 + self.over_selection)))
        return sorted(self.rng.sample(nodes, size)), need

    # -- down --------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        node_ids, need = self.sample(grid)
        if self.on_sampled:
            self.on_sampled(server_round, node_ids, need)
        config[wire.SERVER_ROUND] = server_round
        model = {k: v.numpy().astype(np.float32) for k, v in arrays.items()}
        delta_record = None
        if self.downlink == "delta" and self.view is not None:
            enc, view = self.encode_delta(flatten(model), flatten(self.view))
            delta_record = encoded_record(enc)
            new_view = unflatten(view, model)
        else:
            new_view = model
        full_record = ArrayRecord({k: Array(v) for k, v in new_view.items()})
        seeded = self.view is None and self.seeded(new_view)
        messages = []
        for node in node_ids:
            cfg = ConfigRecord(dict(config))
            if seeded:  # round 1 of a fresh run: the gateway builds the seeded model and checks the digest
                cfg[wire.SEEDED_START] = str(self.seeded_start)
                content = RecordDict({self.configrecord_key: cfg})
            elif delta_record is not None and node in self.current:
                cfg[wire.BASE_ROUND] = self.view_round
                content = RecordDict({"delta": delta_record, self.configrecord_key: cfg})
            else:
                content = RecordDict({self.arrayrecord_key: full_record, self.configrecord_key: cfg})
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        self.view, self.view_round = new_view, server_round
        log(INFO, "configure_train: %d gateways sampled for %d needed (%s downlink)", len(node_ids), need,
            self.downlink)
        return messages

    def encode_delta(self, target: np.ndarray, base: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``target - base`` encoded by the codec's downlink, and the view a gateway holding ``base`` rebuilds
        from it (the server keeps that view, so a lossy downlink never drifts apart)."""
        down = self.codec.for_downlink()
        enc = down.encode(target - base, self.down_rng)
        return enc, (base + down.decode(enc, base.size)).astype(np.float32)

    def seeded(self, model: Mapping[str, np.ndarray]) -> bool:
        """Whether gateways can build ``model`` themselves: the delta downlink and the task's seeded initial model."""
        return self.downlink == "delta" and self.seeded_start is not None and weights_digest(model) == self.seeded_start

    # -- up ----------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every update into full weights, then aggregate them with the Flower strategy
        next in the class order: FedAvg's weighted mean here; Krum's selection, the
        coordinate-wise median or trimmed mean for the classes in ``robust.py``."""
        decoded = self.decode_replies(server_round, replies)
        if not decoded:
            return None, None
        return super().aggregate_train(server_round, decoded)

    def check_norm(self, update: np.ndarray) -> None:
        """A decoded update must be finite and, with ``max_update_norm``, no longer than it (L2)."""
        norm = float(np.linalg.norm(update.astype(np.float64)))
        if not np.isfinite(norm):
            raise ValueError("the decoded update is not finite")
        if self.max_update_norm is not None and norm > self.max_update_norm:
            raise ValueError(f"its L2 norm {norm:.3g} is above fleet.max_update_norm={self.max_update_norm:g}")

    def decode_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The valid replies as Flower strategies expect them: one ``arrays`` record (view +
        decoded update, float32) and one ``metrics`` record (the keys every reply has)."""
        valid: list[Message] = []
        errors: list[Message] = []
        for msg in replies:
            (errors if msg.has_error() else valid).append(msg)
        for msg in errors:
            log(INFO, "gateway %d replied with an error: %s", msg.metadata.src_node_id, msg.error.reason)
        self.current = set()
        self.rejected = {}
        decoded = []
        base = flatten(self.view) if self.view is not None else None
        for msg in valid:
            node = msg.metadata.src_node_id
            if wire.UPDATE not in msg.content and msg.content["metrics"].get(wire.DP_STOPPED):
                log(INFO, "gateway %d has spent its privacy budget and sent no update", node)
                self.current.add(node)  # it still holds this round's model
                continue
            assert base is not None and self.view is not None, "a train reply before configure_train sent a model"
            try:
                update = self.codec.decode(record_arrays(wire.array_record(msg.content, wire.UPDATE)), base.size)
                self.check_norm(update)
                weights = unflatten(base + update, self.view)
            except (KeyError, ValueError, wire.RecordKindError) as err:
                log(WARNING, "gateway %d sent a malformed update, left out of round %d: %s", node, server_round, err)
                self.rejected[node] = f"malformed update, left out: {err}"
                continue
            decoded.append((msg, weights))
            self.current.add(node)
        # Flower's strategies refuse replies whose metric keys differ (gateways on other versions or settings)
        keys = set.intersection(*(set(m.content["metrics"].keys()) for m, _ in decoded)) if decoded else set()
        return [message_with_metadata(msg.metadata, RecordDict({
                    "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                    "metrics": MetricRecord({k: v for k, v in wire.metric_record(msg.content, "metrics").items()
                                             if k in keys})}))
                for msg, weights in decoded]


def build(cfg: Mapping[str, Any], ctx: BuildContext) -> CodecFedAvg:  # noqa: ARG001
    return CodecFedAvg(**ctx.common)


SPEC = StrategySpec(
    name="fedavg", build=build, validate=no_checks, uplink="plaintext", client_dp="wrappers",
    describe="the codec's encoding of the update; the server sees each gateway's update",
)
