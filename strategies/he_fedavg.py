"""Homomorphic FedAvg: the server aggregates updates it cannot read.

Contract with the ClientApp (``clients/app.py``), on top of :class:`CodecFedAvg`'s:

* **Down** (``train``): the model as in CodecFedAvg (plaintext: every party sees the
  global model), plus ``he-ranges`` (one clipping range per tensor, shared by every
  gateway), ``he-weight`` (this gateway's share of the round × gateways sampled, from
  the example counts it reported; 1 under DP) and ``he-fingerprint`` (the key set).
* **Up**: ``he-update`` — one uint8 array, the packed ciphertexts of the quantised update
  (:func:`strategies.he.encrypt_update`) — and ``he`` (ConfigRecord: ``fingerprint``,
  ``digest`` = SHA-256 of the bytes), ``metrics`` as usual.
* **Aggregate**: every reply is checked (key-set fingerprint, digest, number of
  ciphertexts, coefficient ranges); one that fails is left out *with the gateway named*
  and the round goes on. The rest are added homomorphically (:meth:`KeySet.add`).
* **Decrypt** (``query.he_decrypt``): the sum goes to one of the gateways that took part;
  it refuses sums of fewer than ``min_aggregate`` updates, decrypts, and returns the slot
  values. If it does not answer, the next one is asked. The server divides by the total
  weight: new global = view + mean update.

The server holds only ``server.he`` (parameters and public key). What each party learns
is set out in the README (threat model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from iiotfl.compat.flower import GaussianPrivacyEvent
from iiotfl.configs import ConfigError, integer, number
from iiotfl.strategies import he, wire
from iiotfl.strategies.codec_fedavg import CodecFedAvg
from iiotfl.strategies.codecs import flatten, unflatten
from iiotfl.strategies.spec import BuildContext, StrategySpec


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def verified_payload(record: ArrayRecord, meta: Mapping[str, object], fingerprint: str) -> bytes:
    """Ciphertext bytes of ``record`` after checking ``meta``'s key-set fingerprint and digest."""
    if meta.get(wire.FINGERPRINT) != fingerprint:
        raise he.HEError(f"encrypted under key set {meta.get('fingerprint')!r}, the fleet's is "
                         f"{fingerprint!r} (give the gateway this run's device.he)")
    payload = record[wire.CT].numpy().tobytes()
    if digest(payload) != meta.get(wire.DIGEST):
        raise he.HEError("ciphertext bytes do not match their digest (tampered or corrupted in transit)")
    return payload


class HEFedAvg(CodecFedAvg):
    """CodecFedAvg whose uplink is packed BFV ciphertexts, summed without a secret key."""

    def __init__(self, *, keys: str | Path, initial_range: float = 0.05, range_factor: float = 4.0,
                 min_aggregate: int = 2, dp: "HEDP | None" = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keys = he.KeySet.load(Path(keys))
        if self.keys.can_decrypt:
            raise he.HEError(f"{keys} holds a secret key; the server must be given server.he, never device.he")
        self.initial_range = float(initial_range)
        self.range_factor = float(range_factor)
        self.min_aggregate = int(min_aggregate)
        self.dp = dp
        self.counts: dict[int, int] = {}  # node -> examples it last reported (public metadata)
        self.ranges: list[float] | None = None
        self.weights: dict[int, float] = {}
        self.grid: Grid | None = None
        self.rejected: dict[int, str] = {}  # node -> why its update was left out (last round)

    # -- down --------------------------------------------------------------------------
    def tensor_ranges(self) -> list[float]:
        if self.dp is not None:
            return [self.dp.range] * len(self.view or {})
        return self.ranges or [self.initial_range] * len(self.view or {})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.grid = grid
        messages = list(super().configure_train(server_round, arrays, config, grid))
        nodes = [m.metadata.dst_node_id for m in messages]
        if self.dp is not None:  # equal weights: what the accountant assumes
            self.weights = {n: 1.0 for n in nodes}
        else:
            known = [self.counts[n] for n in nodes if n in self.counts]
            default = float(np.mean(known)) if known else 1.0
            counts = {n: float(self.counts.get(n, default)) for n in nodes}
            total = sum(counts.values())
            self.weights = {n: counts[n] * len(nodes) / total for n in nodes}
        ranges = self.tensor_ranges()
        for msg in messages:
            cfg = wire.config_record(msg.content, "config")
            cfg[wire.HE_RANGES] = ranges
            cfg[wire.HE_WEIGHT] = self.weights[msg.metadata.dst_node_id]
            cfg[wire.HE_FINGERPRINT] = self.keys.fingerprint
            if self.dp is not None:
                cfg[wire.HE_DP_CLIP] = self.dp.clipping_norm
                cfg[wire.HE_DP_SIGMA] = self.dp.share_sigma
        self.sent_ranges = ranges
        return messages

    # -- up ----------------------------------------------------------------------------
    def check(self, msg: Message, expected: int) -> bytes:
        """The reply's ciphertext bytes, or HEError saying what is wrong with them."""
        content = msg.content
        if wire.HE_UPDATE not in content or wire.HE not in content:
            raise he.HEError("no encrypted update in the reply (is the gateway running strategy=he?)")
        payload = verified_payload(wire.array_record(content, wire.HE_UPDATE), content[wire.HE], self.keys.fingerprint)
        self.keys.coefficients(payload, expected)
        return payload

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        view = self.view
        assert view is not None, "a train reply before configure_train sent a model"
        base = flatten(view)
        expected = he.ciphertext_count(base.size)
        payloads, nodes, contents = [], [], []
        self.current, self.rejected = set(), {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(INFO, "gateway %d replied with an error: %s", node, msg.error.reason)
                continue
            metrics = msg.content["metrics"]
            if wire.NUM_EXAMPLES in metrics:
                self.counts[node] = wire.as_int(metrics[wire.NUM_EXAMPLES])
            try:
                payloads.append(self.check(msg, expected))
            except (he.HEError, KeyError, ValueError, wire.RecordKindError) as err:
                self.rejected[node] = str(err)
                log(WARNING, "round %d: update of gateway %d rejected, the others go on: %s", server_round, node, err)
                continue
            nodes.append(node)
            contents.append(RecordDict({"metrics": metrics}))
        if len(nodes) < max(1, self.min_aggregate):
            log(WARNING, "round %d: %d valid encrypted updates, fewer than he.min_aggregate=%d; nothing aggregated",
                server_round, len(nodes), self.min_aggregate)
            return None, None
        total = self.keys.add(payloads, expected)
        slots = self.decrypt(total, nodes, server_round)
        if slots is None:
            return None, None
        ranges = he.element_ranges(self.sent_ranges, view)
        total_weight = sum(self.weights[n] for n in nodes)
        if self.dp is not None:
            self.dp.record(len(nodes))
        mean = he.decode_sum(slots, base.size, ranges, total_weight)
        if self.dp is None:  # next round's shared ranges from this aggregate (public to the server)
            parts = unflatten(mean, view)
            self.ranges = [max(self.range_factor * float(np.abs(v).max(initial=0.0)), 1e-6) for v in parts.values()]
        self.current = set(nodes)
        weights = unflatten(base + mean, view)
        arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def privacy_spent(self):
        """ε so far under client-level DP (None without): what the ServerApp logs each round."""
        return self.dp.spent() if self.dp is not None else None

    def decrypt(self, total: bytes, contributors: list[int], server_round: int) -> np.ndarray | None:
        """Ask the contributors, one after the other, to decrypt the sum."""
        assert self.grid is not None, "decrypt before configure_train gave the strategy its grid"
        return decrypt_sum(self.grid, total, contributors, server_round, self.keys, self.min_aggregate)


def decrypt_sum(grid: Grid, total: bytes, contributors: list[int], server_round: int, keys: he.KeySet,
                min_aggregate: int) -> np.ndarray | None:
    for node in contributors:
        content = RecordDict({
            wire.SUM: ArrayRecord({wire.CT: Array(np.frombuffer(total, dtype=np.uint8))}),
            "config": ConfigRecord({wire.CONTRIBUTORS: len(contributors), wire.MIN_AGGREGATE: min_aggregate,
                                    wire.FINGERPRINT: keys.fingerprint, wire.DIGEST: digest(total),
                                    wire.SERVER_ROUND: server_round}),
        })
        replies = list(grid.send_and_receive([Message(content=content, dst_node_id=node,
                                                      message_type=wire.QUERY_HE_DECRYPT)]))
        for reply in replies:
            if reply.has_error():
                log(WARNING, "gateway %d could not decrypt the round-%d sum: %s", node, server_round,
                    reply.error.reason)
            elif wire.SLOTS in reply.content:
                return wire.array_record(reply.content, wire.SLOTS)[wire.SLOTS].numpy().astype(np.int64)
    log(WARNING, "round %d: no gateway decrypted the aggregate; nothing aggregated", server_round)
    return None


class HEDP:
    """Client-level DP inside encrypted aggregation: distributed Gaussian noise.

    Every gateway clips its update to ``clipping_norm`` (L2) and adds Gaussian noise of
    std ``share_sigma`` per element *before encrypting*; nobody ever holds an un-noised
    sum. Shares are sized so that the noise of ``min_devices − 1`` gateways (the sum
    without one colluding gateway's own share) already has std ``z · C``; if more take
    part the noise is larger, never smaller. The accountant (Flower's RDP accountant)
    records, each round, the noise actually in the sum from the gateways that made it,
    minus one share: ``z_eff = share_sigma · sqrt(replies − 1) / C``.
    """

    def __init__(self, noise_multiplier: float, clipping_norm: float, min_devices: int, accountant, population: int,
                 delta: float):
        if min_devices < 2:
            raise ValueError("distributed DP noise needs at least 2 gateways per round")
        self.z = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.share_sigma = self.z * self.clipping_norm / np.sqrt(min_devices - 1)
        self.range = self.clipping_norm + 4.0 * self.share_sigma  # quantisation range per element
        self.accountant = accountant
        self.population = population
        self.delta = float(delta)
        self.history: list[float] = []  # effective noise multiplier per round

    def record(self, replies: int) -> None:
        z_eff = self.share_sigma * np.sqrt(max(replies - 1, 1)) / self.clipping_norm
        self.history.append(float(z_eff))
        self.accountant.compose(GaussianPrivacyEvent(noise_multiplier=float(z_eff), sample_size=self.population,
                                                     population_size=self.population))

    def epsilon(self, delta: float) -> float:
        return float(self.accountant.get_epsilon(delta)) if self.history else 0.0

    def spent(self):
        """ε and δ so far, and the last round's effective noise multiplier (what the ServerApp logs)."""
        return SimpleNamespace(epsilon=self.epsilon(self.delta), delta=self.delta,
                               noise_multiplier=self.history[-1] if self.history else None)


def validate(cfg: Mapping[str, Any]) -> None:
    """strategy=he: its parameters, the digit headroom, and the codec it replaces."""
    gateways = int(cfg["fleet"]["gateways"])
    if cfg["codec"]["name"] != "none":
        raise ConfigError("config: strategy=he quantises updates itself; use codec=none with it")
    number(cfg, "strategy.initial_range", 0.0, 1e6, low_open=True)
    number(cfg, "strategy.range_factor", 1.0, 1e6)
    integer(cfg, "strategy.min_aggregate", 2)
    if gateways > he.MAX_DEVICES:
        raise ConfigError(f"config: strategy=he sums at most {he.MAX_DEVICES} gateways per round (digit headroom); "
                          f"set fleet.clients_per_round <= {he.MAX_DEVICES}")
    if gateways < 2:
        raise ConfigError("config: strategy=he needs fleet.gateways >= 2 (one gateway's sum is its update)")


def build(cfg: Mapping[str, Any], ctx: BuildContext) -> HEFedAvg:
    st = cfg["strategy"]
    keys = ctx.keys or Path(str(st["keys"]))
    return HEFedAvg(keys=keys / he.SERVER_FILE, initial_range=float(st["initial_range"]),
                    range_factor=float(st["range_factor"]), min_aggregate=int(st["min_aggregate"]), dp=ctx.dp,
                    **ctx.common)


SPEC = StrategySpec(
    name="he", build=build, validate=validate, uplink="encrypted", client_dp="distributed", needs_keys=True,
    describe="model update, {noise}int8-quantised, encrypted (BFV, packed 4 per slot); the server adds "
             "ciphertexts and learns only the sum",
)
