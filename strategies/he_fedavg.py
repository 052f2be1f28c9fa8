"""Homomorphic FedAvg: the server aggregates updates it cannot read.

Contract with the ClientApp (``clients/app.py``), on top of :class:`CodecFedAvg`'s:

* **Down** (``train``): the model as in CodecFedAvg (plaintext: every party sees the
  global model), plus ``he-ranges`` (one clipping range per tensor, shared by every
  gateway), ``he-weight`` (this gateway's share of the round × gateways sampled, from
  the example counts it reported; 1 under DP) and ``he-fingerprint`` (the key set).
* **Up**: ``he-update`` — one uint8 array, the packed ciphertexts of the quantised update
  (:func:`strategies.he.encrypt_update`) — and ``he`` (ConfigRecord: ``fingerprint``,
  ``digest`` = SHA-256 of the bytes, and the *binding*: ``kind``, ``run-id``,
  ``server-round``, ``node-id`` and ``tag`` = HMAC-SHA256 over all of them and the digest,
  keyed by HKDF of the fleet's secret key (:meth:`KeySet.bind`): only a gateway can make
  or check it), ``metrics`` as usual. Round 0's statistics travel the same way
  (``stats-he``, kind ``stats``, round 0).
* **Aggregate**: every reply is checked (:func:`contribution`: key-set fingerprint,
  digest, the binding's run, round, node and kind against what the server knows, number
  of ciphertexts, SEAL loads each one); one that fails is left out *with the gateway
  named* and the round goes on. The rest are added homomorphically (:meth:`KeySet.add`).
* **Decrypt** (``query.he_decrypt``): the server sends one contributor the round's
  contributions themselves with their tags (``parts``, ``nodes``, ``tags``) and the digest
  of the sum it made. The gateway (:func:`bound_sum`) decrypts only the round and kind it
  last contributed to (kept in its ``context.state``), once; only if its own
  contribution is in, the gateways are distinct and at least *its own* minimum
  (``he-min-aggregate`` node config, run config ``strategy.min_aggregate``, never the
  server's message), every tag verifies for this run, round and node, and its own sum's
  digest is the server's. A contribution whose tag fails is named in a ``refused``
  reply: the server leaves it out (named) and asks again. The decrypted slots must have
  this task's length and be in range (:func:`checked_slots`). If the gateway does not
  answer, the next one is asked. The server divides by the total weight.

What a malicious server can still learn. Holding no device key: the sum of each round,
as intended, and — because each gateway decrypts once a round but does not know what
the others decrypted — *different subsets* of one round's contributions from different
gateways (each subset ≥ that gateway's minimum and containing it): the differences
reveal single contributions whenever more gateways contribute than the minimum. Setting
``he-min-aggregate`` to the cohort size closes this, at the price of rounds that fail
when one gateway drops out; closing it otherwise needs threshold decryption. The
decrypting gateway receives every contribution of the round (to add them itself): it
holds the fleet's key and could read them, as the shared key allows any gateway that
sees a ciphertext. With **one** device key (a colluding gateway, a stolen device.he),
nothing is protected: it decrypts every ciphertext and forges every binding.

The server holds only ``server.he`` (parameters and public key). What each party learns
is set out in the README (threat model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from iiotfl.compat.flower import GaussianPrivacyEvent
from iiotfl.configs import ConfigError, integer, number
from iiotfl.strategies import he, wire
from iiotfl.strategies.codec_fedavg import CodecFedAvg
from iiotfl.strategies.codecs import flatten, unflatten
from iiotfl.strategies.spec import BuildContext, StrategySpec, server_step


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


# -- the server's side of a contribution ----------------------------------------------------
@dataclass(frozen=True)
class Contribution:
    """One gateway's ciphertexts after the server's checks, and the tag only a gateway can verify."""

    node: int
    payload: bytes
    tag: str


def contribution(msg: Message, record: str, kind: str, server_round: int, keys: he.KeySet,
                 expected: int) -> Contribution:
    """A reply's encrypted contribution after every check the server can make, else HEError.

    Fingerprint and digest; the binding's kind, run, round and node against this reply's;
    the ciphertext count; SEAL loading every ciphertext. The tag is keyed with gateway-only
    material: the decrypting gateway verifies it (:func:`bound_sum`)."""
    content = msg.content
    if record not in content or wire.HE not in content:
        raise he.HEError(f"no encrypted {kind} in the reply (is the gateway running strategy=he?)")
    meta = wire.config_record(content, wire.HE)
    payload = verified_payload(wire.array_record(content, record), meta, keys.fingerprint)
    claimed = tuple(str(meta.get(k)) for k in (wire.KIND, wire.RUN_ID, wire.SERVER_ROUND, wire.NODE_ID))
    actual = (kind, str(msg.metadata.run_id), str(server_round), str(msg.metadata.src_node_id))
    if claimed != actual:
        raise he.HEError(f"ciphertext bound to (kind, run, round, node) {claimed}, this reply is {actual}: "
                         "replayed or misdirected")
    tag = meta.get(wire.TAG)
    if not isinstance(tag, str) or len(tag) != 64:
        raise he.HEError("ciphertext carries no binding tag; update the gateway to this iiotfl version")
    keys.ciphertexts(payload, expected)  # whole ciphertexts, the expected count, and SEAL loads each
    return Contribution(msg.metadata.src_node_id, payload, tag)


def decrypt_request(parts: list[Contribution], server_round: int, kind: str, keys: he.KeySet) -> RecordDict:
    """``query.he_decrypt``: the contributions and their tags, and the digest of the server's sum."""
    total = keys.add([p.payload for p in parts])
    return RecordDict({
        wire.PARTS: ArrayRecord({str(p.node): Array(np.frombuffer(p.payload, dtype=np.uint8)) for p in parts}),
        "config": ConfigRecord({wire.FINGERPRINT: keys.fingerprint, wire.SERVER_ROUND: server_round, wire.KIND: kind,
                                wire.NODES: [str(p.node) for p in parts], wire.TAGS: [p.tag for p in parts],
                                wire.DIGEST: digest(total)}),
    })


@dataclass
class Decrypted:
    """What :func:`decrypt_sum` got: the slots (None: no gateway decrypted), whose sum, who was refused."""

    slots: np.ndarray | None
    nodes: list[int]
    refused: dict[int, str]  # node -> why the decrypting gateway refused its contribution


def _refused(reply: Message, parts: list[Contribution]) -> dict[int, str]:
    """The contributions a gateway's ``refused`` reply names (only those in the request)."""
    try:
        record = wire.config_record(reply.content, wire.REFUSED)
        named = set(wire.as_ints(record[wire.NODES]))
        reason = wire.as_str(record[wire.REASON])
    except (KeyError, TypeError, ValueError, wire.RecordKindError):
        return {}
    return {p.node: reason for p in parts if p.node in named}


def decrypt_sum(grid: Grid, parts: list[Contribution], server_round: int, kind: str, keys: he.KeySet,
                min_aggregate: int) -> Decrypted:
    """Ask the contributors, one after the other, to decrypt the sum of ``parts``.

    Contributions a gateway refuses (binding not verified) are left out and the rest asked
    again, while at least ``min_aggregate`` (and 2) remain."""
    parts, failed = list(parts), set()
    refused: dict[int, str] = {}
    while len(parts) >= max(2, min_aggregate):
        node = next((p.node for p in parts if p.node not in failed), None)
        if node is None:
            break
        msg = Message(content=decrypt_request(parts, server_round, kind, keys), dst_node_id=node,
                      message_type=wire.QUERY_HE_DECRYPT)
        reply = next(iter(grid.send_and_receive([msg])), None)
        if reply is not None and reply.has_content() and wire.SLOTS in reply.content:
            slots = wire.array_record(reply.content, wire.SLOTS)[wire.SLOTS].numpy().astype(np.int64)
            return Decrypted(slots, [p.node for p in parts], refused)
        dropped = _refused(reply, parts) if reply is not None and reply.has_content() else {}
        if not dropped:
            failed.add(node)
            why = reply.error.reason if reply is not None and reply.has_error() else "no answer"
            log(WARNING, "gateway %d could not decrypt the round-%d sum: %s", node, server_round, why)
        refused.update(dropped)
        parts = [p for p in parts if p.node not in dropped]
    log(WARNING, "round %d: no gateway decrypted the aggregate; nothing aggregated", server_round)
    return Decrypted(None, [p.node for p in parts], refused)


# -- the decrypting gateway's side --------------------------------------------------------
@dataclass(frozen=True)
class Sent:
    """What a gateway last encrypted in this run (kept in its ``context.state``): the one sum it may decrypt."""

    kind: str
    server_round: int
    digest: str
    ciphertexts: int
    values: int  # an update's length, or the number of statistics
    decrypted: bool = False

    def record(self) -> ConfigRecord:
        return ConfigRecord({"kind": self.kind, "round": self.server_round, "digest": self.digest,
                             "ciphertexts": self.ciphertexts, "values": self.values, "decrypted": self.decrypted})

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> "Sent":
        return cls(wire.as_str(rec["kind"]), wire.as_int(rec["round"]), wire.as_str(rec["digest"]),
                   wire.as_int(rec["ciphertexts"]), wire.as_int(rec["values"]), bool(rec["decrypted"]))


class Unbound(he.HEError):
    """A decrypt request holds contributions whose binding fails: ``nodes``, for the server to leave out."""

    def __init__(self, nodes: list[int], server_round: int) -> None:
        super().__init__(f"contribution(s) of gateway(s) {', '.join(map(str, nodes))} not bound to this run and "
                         f"round {server_round} (another key set, tampered or replayed); refused")
        self.nodes = nodes


def _request(content: RecordDict) -> tuple[ConfigRecord, int, str, list[int], list[str], ArrayRecord]:
    """A decrypt request's fields: (config, round, kind, nodes, tags, parts), else HEError."""
    try:
        config = wire.config_record(content, "config")
        nodes, tags = wire.as_ints(config[wire.NODES]), [wire.as_str(t) for t in cast(list, config[wire.TAGS])]
        request = (config, wire.as_int(config[wire.SERVER_ROUND]), wire.as_str(config[wire.KIND]), nodes, tags,
                   wire.array_record(content, wire.PARTS))
    except (KeyError, TypeError, ValueError, wire.RecordKindError) as err:
        raise he.HEError(f"malformed decrypt request ({type(err).__name__}: {err}); refused") from None
    if len(set(nodes)) != len(nodes) or len(tags) != len(nodes) or set(request[5].keys()) != set(map(str, nodes)):
        raise he.HEError("decrypt request lists a gateway twice, or its nodes, tags and ciphertexts disagree; refused")
    return request


def _check_turn(config: ConfigRecord, keys: he.KeySet, sent: Sent | None, server_round: int, kind: str) -> Sent:
    """This gateway's own record allows this request: its key set, its current round and kind, not yet decrypted."""
    if config.get(wire.FINGERPRINT) != keys.fingerprint:
        raise he.HEError(f"decrypt request for key set {config.get(wire.FINGERPRINT)!r}, this gateway's is "
                         f"{keys.fingerprint!r}; refused")
    if sent is None:
        raise he.HEError("this gateway has encrypted nothing in this run; it decrypts only a sum it is part of")
    if (kind, server_round) != (sent.kind, sent.server_round):
        raise he.HEError(f"asked to decrypt a round-{server_round} {kind} sum, this gateway's current contribution is "
                         f"round {sent.server_round}'s {sent.kind}: replayed or out of turn; refused")
    if sent.decrypted:
        raise he.HEError(f"this gateway already decrypted the round-{server_round} {kind} sum; one a round, refused")
    return sent


def bound_sum(content: RecordDict, keys: he.KeySet, run_id: int, node_id: int, sent: Sent | None,
              minimum: int) -> tuple[bytes, int]:
    """The decrypting gateway's checks: (the sum of the request's contributions, how many), else HEError;
    :class:`Unbound` names the contributions whose tag does not bind them to this run, round and node."""
    config, server_round, kind, nodes, tags, parts = _request(content)
    sent = _check_turn(config, keys, sent, server_round, kind)
    if len(nodes) < minimum:
        raise he.HEError(f"asked to decrypt a sum of {len(nodes)} contribution(s); this gateway decrypts only sums of "
                         f"at least {minimum} (its own he-min-aggregate / strategy.min_aggregate)")
    payloads = {n: parts[str(n)].numpy().tobytes() for n in nodes}
    if node_id not in payloads or digest(payloads[node_id]) != sent.digest:
        raise he.HEError(f"this gateway's own round-{server_round} contribution is not in the sum; refused")
    unbound = [n for n, t in zip(nodes, tags) if not keys.is_bound(t, kind, run_id, server_round, n, payloads[n])]
    if unbound:
        raise Unbound(unbound, server_round)
    total = keys.add(list(payloads.values()), sent.ciphertexts)
    if digest(total) != config.get(wire.DIGEST):
        raise he.HEError("the sum of the contributions sent differs from the server's sum; refused")
    return total, len(nodes)


def checked_slots(slots: np.ndarray, sent: Sent, devices: int) -> np.ndarray:
    """Decrypted slots of this task's length and range (an update, or ``devices`` devices' statistics), else HEError."""
    if sent.kind == wire.HE_KIND_UPDATE:
        he.check_update_sum(slots, sent.values)
    else:
        he.check_limb_sum(slots, sent.values, devices)
    return slots


class SecureSumFedAvg(CodecFedAvg):
    """CodecFedAvg whose server sees only the sum of the gateways' quantised updates.

    What ``strategy=he`` and ``strategy=mask`` share: the shared per-tensor ranges and each
    gateway's FedAvg weight on the downlink (:meth:`configure_train`), checking every reply
    and naming the gateway of one left out (:meth:`_contributions`), and decoding the integer
    sum into the weighted mean update (:meth:`aggregate_train`). A subclass says how a reply
    is checked (:meth:`check`) and how the sum of the checked ones is obtained
    (:meth:`secure_sum`: decrypted by a gateway, or unmasked)."""

    def __init__(self, *, initial_range: float = 0.05, range_factor: float = 4.0, min_aggregate: int = 2,
                 dp: "HEDP | None" = None, server_lr: float = 1.0, server_momentum: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_lr, self.server_momentum = float(server_lr), float(server_momentum)
        self.velocity: np.ndarray | None = None  # FedAvgM's v (server_momentum > 0)
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

    def train_config(self, server_round: int, nodes: list[int]) -> dict[int, dict[str, Any]]:
        """What a subclass adds to each node's train config (its key set, the cohort's keys)."""
        return {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.grid = grid
        messages = list(super().configure_train(server_round, arrays, config, grid))
        messages = self.cohort(server_round, messages)
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
        extra = self.train_config(server_round, nodes)
        for msg in messages:
            cfg = wire.config_record(msg.content, "config")
            cfg[wire.HE_RANGES] = ranges
            cfg[wire.HE_WEIGHT] = self.weights[msg.metadata.dst_node_id]
            for key, value in extra.get(msg.metadata.dst_node_id, {}).items():
                cfg[key] = value
            if self.dp is not None:
                cfg[wire.HE_DP_CLIP] = self.dp.clipping_norm
                cfg[wire.HE_DP_SIGMA] = self.dp.share_sigma
        self.sent_ranges = ranges
        return messages

    def cohort(self, server_round: int, messages: list[Message]) -> list[Message]:  # noqa: ARG002
        """The train messages a subclass keeps (mask: only gateways whose run keys it holds)."""
        return messages

    # -- up ----------------------------------------------------------------------------
    def check(self, msg: Message, server_round: int, size: int) -> Any:
        """The reply's checked contribution (with a ``node``), else an error saying what is wrong with it."""
        raise NotImplementedError

    def secure_sum(self, parts: list[Any], server_round: int, size: int) -> Decrypted:
        """The integer sum of ``parts``' quantised updates (``size`` values), whose, and who was refused."""
        raise NotImplementedError

    def _reject(self, server_round: int, node: int, metrics: MetricRecord | None, why: object) -> None:
        self.rejected[node] = str(why)
        partition = metrics.get("partition", "?") if metrics is not None else "?"
        log(WARNING, "round %d: update of gateway %d (partition %s) left out, the others go on: %s", server_round,
            node, partition, why)

    def _contributions(self, server_round: int, replies: Iterable[Message], size: int
                       ) -> tuple[list[Any], dict[int, MetricRecord]]:
        """The replies' checked contributions (the first per gateway) and their metrics."""
        parts, metrics, seen = [], {}, set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(INFO, "gateway %d replied with an error: %s", node, msg.error.reason)
                continue
            record = msg.content.metric_records.get("metrics")
            if record is not None and wire.NUM_EXAMPLES in record:
                self.counts[node] = wire.as_int(record[wire.NUM_EXAMPLES])
            if node in seen:  # the first is kept: a second would make the decrypting gateway refuse the sum
                log(WARNING, "round %d: a second reply of gateway %d left out", server_round, node)
                continue
            seen.add(node)
            try:
                parts.append(self.check(msg, server_round, size))
            except (he.HEError, KeyError, TypeError, ValueError, wire.RecordKindError) as err:
                self._reject(server_round, node, record, err)
                continue
            metrics[node] = record if record is not None else MetricRecord()
        return parts, metrics

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        view = self.view
        assert view is not None, "a train reply before configure_train sent a model"
        base = flatten(view)
        self.current, self.rejected = set(), {}
        parts, metrics = self._contributions(server_round, replies, base.size)
        if len(parts) < max(1, self.min_aggregate):
            log(WARNING, "round %d: %d valid updates, fewer than strategy.min_aggregate=%d; nothing aggregated",
                server_round, len(parts), self.min_aggregate)
            return None, None
        summed = self.secure_sum(parts, server_round, base.size)
        for node, why in summed.refused.items():
            self._reject(server_round, node, metrics.get(node), why)
        if summed.slots is None:
            return None, None
        nodes = summed.nodes
        ranges = he.element_ranges(self.sent_ranges, view)
        total_weight = sum(self.weights[n] for n in nodes)
        if self.dp is not None:
            self.dp.record(len(nodes))
        mean = he.decode_digits(summed.slots, ranges, total_weight)
        if self.dp is None:  # next round's shared ranges from this aggregate (public to the server)
            tensors = unflatten(mean, view)
            self.ranges = [max(self.range_factor * float(np.abs(v).max(initial=0.0)), 1e-6) for v in tensors.values()]
        self.current = set(nodes)
        weights = unflatten(base + self.server_step(mean), view)
        arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
        contents = [RecordDict({"metrics": metrics[n]}) for n in nodes]
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def server_step(self, mean: np.ndarray) -> np.ndarray:
        """How far the model moves: FedAvgM's step on the mean update (``strategy.server_lr``,
        ``strategy.server_momentum``; Flower's FedAvgM does the same for plaintext updates, ``strategy=fedavgm``):
        v <- momentum x v + mean, the model moves by server_lr x v. The mean is what the secure sum reveals to the
        server anyway, so the step is post-processing: no privacy cost, nothing more seen. 1.0 and 0.0 (the
        defaults) are FedAvg. v is not in the checkpoint: a resumed run starts it again from zero."""
        if self.server_momentum > 0:
            self.velocity = mean if self.velocity is None else self.server_momentum * self.velocity + mean
            mean = self.velocity
        return self.server_lr * mean

    def privacy_spent(self):
        """ε so far under client-level DP (None without): what the ServerApp logs each round."""
        return self.dp.spent() if self.dp is not None else None


class HEFedAvg(SecureSumFedAvg):
    """Secure-sum FedAvg whose uplink is packed BFV ciphertexts, summed without a secret key."""

    def __init__(self, *, keys: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keys = he.KeySet.load(Path(keys))
        if self.keys.can_decrypt:
            raise he.HEError(f"{keys} holds a secret key; the server must be given server.he, never device.he")

    def train_config(self, server_round: int, nodes: list[int]) -> dict[int, dict[str, Any]]:
        return {n: {wire.HE_FINGERPRINT: self.keys.fingerprint} for n in nodes}

    def check(self, msg: Message, server_round: int, size: int) -> Contribution:
        """The reply's checked, bound contribution, or HEError saying what is wrong with it."""
        return contribution(msg, wire.HE_UPDATE, wire.HE_KIND_UPDATE, server_round, self.keys,
                            he.ciphertext_count(size))

    def secure_sum(self, parts: list[Contribution], server_round: int, size: int) -> Decrypted:
        """Ask the contributors, one after the other, to decrypt the sum; its digits unpacked."""
        decrypted = self.decrypt(parts, server_round)
        if decrypted.slots is not None:
            decrypted.slots = he.unpack(decrypted.slots, size)
        return decrypted

    def decrypt(self, parts: list[Contribution], server_round: int) -> Decrypted:
        """Ask the contributors, one after the other, to decrypt the sum."""
        assert self.grid is not None, "decrypt before configure_train gave the strategy its grid"
        return decrypt_sum(self.grid, parts, server_round, wire.HE_KIND_UPDATE, self.keys, self.min_aggregate)


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
        self.released = False  # whether an aggregate was released since the last :meth:`spent`

    def record(self, replies: int) -> None:
        z_eff = self.share_sigma * np.sqrt(max(replies - 1, 1)) / self.clipping_norm
        self.history.append(float(z_eff))
        self.released = True
        self.accountant.compose(GaussianPrivacyEvent(noise_multiplier=float(z_eff), sample_size=self.population,
                                                     population_size=self.population))

    def epsilon(self, delta: float) -> float:
        return float(self.accountant.get_epsilon(delta)) if self.history else 0.0

    def spent(self):
        """ε and δ so far, and this round's effective noise multiplier (what the ServerApp logs once a
        round); None for a round that released no aggregate (too few updates, no decryption)."""
        released, self.released = self.released, False
        return SimpleNamespace(epsilon=self.epsilon(self.delta), delta=self.delta,
                               noise_multiplier=self.history[-1] if released else None)


def validate(cfg: Mapping[str, Any]) -> None:
    """strategy=he: its parameters, the digit headroom, and the codec it replaces."""
    gateways = int(cfg["fleet"]["gateways"])
    if cfg["codec"]["name"] != "none":
        raise ConfigError("config: strategy=he quantises updates itself; use codec=none with it")
    number(cfg, "strategy.initial_range", 0.0, 1e6, low_open=True)
    number(cfg, "strategy.range_factor", 1.0, 1e6)
    integer(cfg, "strategy.min_aggregate", 2)
    server_step(cfg)
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
                    **server_step(cfg), **ctx.common)


SPEC = StrategySpec(
    name="he", build=build,
    extra_exchanges=1, validate=validate, uplink="encrypted", client_dp="distributed", needs_keys=True,
    describe="model update, {noise}int8-quantised, encrypted (BFV, packed 4 per slot); the server adds "
             "ciphertexts and learns only the sum",
)
