"""Masked FedAvg (``strategy=mask``): collusion-resistant secure aggregation at a third of plaintext bytes.

Maths and primitives in ``masking.py``. Contract with the ClientApp (``clients/app.py``),
on top of :class:`~iiotfl.strategies.he_fedavg.SecureSumFedAvg`'s (shared ranges and weight):

* **Key set-up, once per run** (``query.mask_keys``, the first round a gateway is seen, and
  again only for a gateway that lost its keys): the gateway makes X25519 and Ed25519 run keys
  from OS entropy, keeps the private halves in the run's ``context.state`` and replies with the
  public ones (``mask-keys``), signed with its certificate's key when it has an identity.
* **Down** (``train``): the model, ranges and weight as under ``he``, and the cohort: every
  sampled gateway's node id and public run keys (``mask-nodes``, ``mask-agree``, ``mask-sign``),
  and the first time a gateway is sent a peer, the certificate and proof vouching for its keys
  (``mask-certs``, ``mask-proofs``).
* **Up**: ``mask-update`` (the ``k``-bit masked words, :func:`masking.bits_for`) and ``mask``:
  run, round and node, ``bits``, the self-mask seed's Shamir shares sealed one per other cohort
  member, the seed's SHA-256 (``commit``), and an Ed25519 signature over all of it
  (:func:`contribution_message`).
* **Unmask** (``query.mask_unmask``, the one extra exchange a round): the server sends each
  survivor the survivors and the dropped, and the shares sealed for it; the survivor returns
  its opened shares of the *other survivors'* self masks and this round's pair seeds with the
  *dropped*. The server rebuilds each survivor's self mask from ``t`` shares, checks it against
  the commitment, removes it and the dropped pairs' masks, and decodes the sum.

Security model (what the tests in ``tests/adversarial/test_mask_collusion.py`` try to break)
---------------------------------------------------------------------------------------------
Each gateway enforces, from its *own* run config and state, never from the server's message:
the cohort holds itself, distinct node ids and keys, and at least ``strategy.min_cohort``
gateways; ``t = ceil(strategy.threshold × cohort)`` (at least 2); rounds only move forward;
it answers **one** unmask request a round, and only if it is a survivor, survivors and dropped
split the cohort it was given, and at least ``max(t + 1, strategy.min_aggregate)`` survived; it
never reveals a share of its own self mask, nor its X25519 secret, only the seed of one pair
for one round.

* *Honest-but-curious server, any coalition of fewer than t gateways*: a gateway's masked
  words are uniformly random to them: the self mask needs t shares (the coalition holds fewer),
  and every pair with an honest gateway is a ChaCha20 stream of a secret they do not hold. The
  server learns the sum of the survivors and nothing else.
* *Malicious server* (it may send each gateway a different cohort or split, drop, delay or
  replay messages), *with fewer than t_min = ceil(threshold × min_cohort) colluding gateways*:
  to read gateway j's update it needs j's self mask (t shares, which honest peers give only when
  told j survived) and every pair seed between j and an honest peer (given only when that peer
  is told j dropped); each honest peer answers once a round, so for each honest peer it gets one
  or the other, never both, and the coalition's own shares are fewer than t. Replaying an old
  request gets nothing (one answer a round, rounds move forward); a request for an old round is
  refused. It *can* learn the sum of a small set of honest gateways together with colluders'
  known updates (every secure aggregation can): the gateways' minimum ``min_aggregate`` bounds
  the set, colluders included.
* *Key substitution* (the server hands a gateway keys of its own making in place of a peer's):
  with an identity (node config ``identity-cert``/``-key``/``-ca``: the gateway's certificate
  from the fleet's CA, which the local fleet, compose and ``iiotfl gateway --client-cert`` give
  it), each gateway signs its run keys, run and node id with its certificate's key, and accepts a
  peer's keys only under a certificate that CA issued (``masking.Identity``), one per cohort
  member; checked once a run per peer, kept in ``context.state``. Without one, keys are taken as
  relayed and only the honest-but-curious guarantee holds. Malicious *gateways* can spoil a
  round (a wrong share is caught by the commitment and the round is skipped, named), not read
  others' updates.

Dropouts: a gateway that sends no masked update before the deadline is *dropped*; the
survivors' pair seeds with it remove its masks. A survivor's self mask is rebuilt from the
*other* survivors' shares, so a round needs t + 1 survivors: a cohort of 10 with t = 5 goes
on with up to 4 dropped. A survivor that then does not answer the
unmask request costs nothing if no one dropped (its self mask comes from the others' shares);
if some did, its masks towards them cannot be removed and the round is skipped (logged).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Iterable, Mapping, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from iiotfl.configs import ConfigError, integer, number, require
from iiotfl.strategies import he, masking, wire
from iiotfl.strategies.he_fedavg import Decrypted, SecureSumFedAvg
from iiotfl.strategies.masking import Identity, MaskError, RunKeys
from iiotfl.strategies.spec import BuildContext, StrategySpec, server_step

_CONTRIBUTION = b"iiotfl mask contribution v1"
STATE_KEYS = "mask-run"      # context.state: this run's private keys
STATE_ROUND = "mask-round"   # context.state: the round this gateway last masked for
STATE_PEERS = "mask-peers"   # context.state: peers whose run keys a certificate vouched for (keys + identity)


def contribution_message(run_id: int, server_round: int, node: int, bits: int, words: bytes, shares: list[bytes],
                         commit: bytes, cohort: list[int]) -> bytes:
    """What a gateway signs: its binding (run, round, node), the words, its sealed shares, the commitment
    and the cohort it masked for."""
    h = hashlib.sha256(_CONTRIBUTION + struct.pack(">QQQH", run_id, server_round, node, bits))
    h.update(hashlib.sha256(words).digest())
    for share in shares:
        h.update(struct.pack(">H", len(share)) + share)
    h.update(commit)
    h.update(struct.pack(f">{len(cohort)}Q", *cohort))
    return h.digest()


def expected_cohort(cfg: Mapping[str, Any]) -> int:
    """The gateways a round samples: ``fleet.clients_per_round``, else ``fraction_train`` of the fleet."""
    fleet = cfg["fleet"]
    if fleet.get("clients_per_round"):
        return int(fleet["clients_per_round"])
    return max(1, math.ceil(float(fleet["fraction_train"]) * int(fleet["gateways"])))


def min_cohort(cfg: Mapping[str, Any]) -> int:
    """The smallest cohort a gateway masks for: ``strategy.min_cohort`` (an int, or a fraction of the
    expected cohort), and never fewer than 3 (two others to hold shares)."""
    value = cfg["strategy"]["min_cohort"]
    if isinstance(value, float) and value <= 1.0:
        value = math.ceil(value * expected_cohort(cfg))
    return max(3, int(value))


def min_survivors(cfg: Mapping[str, Any], cohort: int, own: int = 0) -> int:
    """The fewest survivors whose sum a gateway helps unmask (:func:`masking.min_survivors`), from its
    run config and its own node config minimum."""
    st = cfg["strategy"]
    return masking.min_survivors(cohort, float(st["threshold"]), int(st["min_aggregate"]), own)


# -- the gateway's side -----------------------------------------------------------------------
def run_keys(context: Context, create: bool = False) -> RunKeys:
    """This gateway's keys for this run (``context.state``), made on first use when ``create``."""
    if STATE_KEYS in context.state:
        rec = wire.config_record(context.state, STATE_KEYS)
        return RunKeys(wire.as_bytes(rec[wire.AGREE]), wire.as_bytes(rec[wire.SIGN]))
    if not create:
        raise MaskError("this gateway holds no run keys for this run (it restarted, or the server skipped the "
                        "key set-up); the server asks again next round")
    keys = RunKeys.generate()
    context.state[STATE_KEYS] = ConfigRecord({wire.AGREE: keys.agree, wire.SIGN: keys.sign})
    return keys


IDENTITY = ("identity-cert", "identity-key", "identity-ca")  # node config: this gateway's identity files


def identity(context: Context) -> Identity | None:
    """This gateway's identity (node config ``identity-cert``, ``identity-key``, ``identity-ca``: its
    certificate from the fleet's CA, its key, the CA), or None when it has none (peers' keys unpinned)."""
    paths = [context.node_config.get(k) for k in IDENTITY]
    if not any(paths):
        return None
    if not all(paths):
        raise MaskError("node config sets only some of identity-cert, identity-key, identity-ca; set all three")
    cert, key, ca = (str(p) for p in paths)
    return Identity.load(cert, key, ca)


def key_reply(context: Context, run_id: int) -> RecordDict:
    """``query.mask_keys``: this run's public keys (made now if this run has none yet), vouched for by
    this gateway's certificate when it has an identity."""
    keys = run_keys(context, create=True)
    record = ConfigRecord({wire.AGREE: keys.agree_public, wire.SIGN: keys.sign_public})
    me = identity(context)
    if me is not None:
        record[wire.CERT], record[wire.PROOF] = me.vouch(run_id, int(context.node_id), keys.agree_public,
                                                         keys.sign_public)
    return RecordDict({wire.MASK_KEYS: record})


def _pinned(config: ConfigRecord, cohort: "Cohort", me: int, own: Identity, context: Context, run_id: int) -> None:
    """Every peer's run keys vouched for by a distinct certificate of the fleet's CA (checked once a run
    per peer and kept in ``context.state``), else MaskError."""
    peers = wire.config_record(context.state, STATE_PEERS) if STATE_PEERS in context.state else ConfigRecord()
    certs = wire.as_bytes_list(config.get(wire.MASK_CERTS, [b""] * len(cohort.nodes)))
    proofs = wire.as_bytes_list(config.get(wire.MASK_PROOFS, [b""] * len(cohort.nodes)))
    if len(certs) != len(cohort.nodes) or len(proofs) != len(cohort.nodes):
        raise MaskError("the cohort's certificates and proofs disagree with its members in number; refused")
    seen = {own.fingerprint}
    for peer, agree, sign, cert, proof in zip(cohort.nodes, cohort.agree, cohort.sign, certs, proofs):
        if peer == me:
            continue
        known = peers.get(str(peer))
        if isinstance(known, bytes) and known[:64] == agree + sign:
            who = known[64:].hex()
        elif cert and proof:
            who = own.verify(cert, proof, run_id, peer, agree, sign)
            peers[str(peer)] = agree + sign + bytes.fromhex(who)
        else:
            raise MaskError(f"gateway {peer}'s run keys come with no certificate of the fleet's CA (keys this "
                            "gateway has not seen vouched for); refused, the server sends them again")
        if who in seen:
            raise MaskError(f"gateway {peer}'s run keys are vouched for by a certificate another cohort member "
                            "uses; refused")
        seen.add(who)
    context.state[STATE_PEERS] = peers


@dataclass(frozen=True)
class Cohort:
    nodes: list[int]
    agree: list[bytes]
    sign: list[bytes]

    def position(self, node: int) -> int:
        return self.nodes.index(node)

    def record(self) -> dict[str, Any]:
        return {wire.MASK_NODES: [str(n) for n in self.nodes], wire.MASK_AGREE: self.agree,
                wire.MASK_SIGN: self.sign}

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> "Cohort":
        """Inverse of :meth:`record` (a train message's config, or this gateway's round state)."""
        return cls(wire.as_ints(rec[wire.MASK_NODES]), wire.as_bytes_list(rec[wire.MASK_AGREE]),
                   wire.as_bytes_list(rec[wire.MASK_SIGN]))


def _cohort(config: ConfigRecord, keys: RunKeys, me: int, cfg: Mapping[str, Any], context: Context,
            run_id: int) -> Cohort:
    """The cohort of a train message after this gateway's own checks, else MaskError: with an identity,
    every peer's keys vouched for by the fleet's CA."""
    try:
        cohort = Cohort.from_record(config)
    except (KeyError, TypeError, ValueError) as err:
        raise MaskError(f"the train message carries no valid cohort ({type(err).__name__}: {err}); is the server "
                        "running strategy=mask?") from None
    n = len(cohort.nodes)
    if len(cohort.agree) != n or len(cohort.sign) != n:
        raise MaskError("the cohort's node ids and keys disagree in number; refused")
    if len(set(cohort.nodes)) != n or len(set(cohort.agree)) != n:
        raise MaskError("the cohort lists a gateway or a key twice; refused")
    if me not in cohort.nodes:
        raise MaskError("this gateway is not in the cohort it was sent; refused")
    i = cohort.position(me)
    if (cohort.agree[i], cohort.sign[i]) != (keys.agree_public, keys.sign_public):
        raise MaskError("the cohort lists keys that are not this gateway's run keys (it restarted since the "
                        "key set-up, or the keys were substituted); refused, the server asks again")
    least = min_cohort(cfg)
    if n < least or n > masking.MAX_COHORT:
        raise MaskError(f"a cohort of {n} gateways; this gateway masks only for {least} to {masking.MAX_COHORT} "
                        "(strategy.min_cohort of its run config); refused")
    own = identity(context)
    if own is not None:
        _pinned(config, cohort, me, own, context, run_id)
    return cohort


def masked_update(context: Context, config: ConfigRecord, update: np.ndarray, view: Mapping[str, np.ndarray],
                  cfg: Mapping[str, Any], rng: np.random.Generator, run_id: int) -> tuple[dict, dict]:
    """The train reply's records for ``update``: the masked words, the sealed shares, the signed binding."""
    me = int(context.node_id)
    keys = run_keys(context)
    cohort = _cohort(config, keys, me, cfg, context, run_id)
    server_round = wire.as_int(config[wire.SERVER_ROUND])
    if STATE_ROUND in context.state:
        last = wire.as_int(wire.config_record(context.state, STATE_ROUND)["round"])
        if server_round <= last:
            raise MaskError(f"asked to mask for round {server_round} after round {last}; rounds only move forward, "
                            "refused (replayed)")
    n = len(cohort.nodes)
    weight = wire.as_float(config[wire.HE_WEIGHT])
    if not 0.0 < weight <= n:
        raise MaskError(f"FedAvg weight {weight} outside (0, {n}] for a cohort of {n}; refused")
    bits = masking.bits_for(n)
    t = masking.threshold_for(n, float(cfg["strategy"]["threshold"]))
    ranges = he.element_ranges(config[wire.HE_RANGES], view)
    values, saturated = he.quantise_update(update, ranges, weight, rng)
    seed = masking.fresh_seed()
    pairs = {peer: masking.pair_seed(keys, pub, run_id, server_round, me, peer)
             for peer, pub in zip(cohort.nodes, cohort.agree) if peer != me}
    words = masking.pack(masking.mask(values, bits, seed, pairs, me), bits)
    shares = masking.split_seed(seed, t, n)
    sealed = [b"" if peer == me else masking.seal_share(keys, pub, share, run_id, server_round, me, peer)
              for peer, pub, share in zip(cohort.nodes, cohort.agree, shares)]
    commit = hashlib.sha256(seed).digest()
    signature = keys.signature(contribution_message(run_id, server_round, me, bits, words.tobytes(), sealed, commit,
                                                    cohort.nodes))
    context.state[STATE_ROUND] = ConfigRecord({"round": server_round, **cohort.record(), "answered": False})
    meta = ConfigRecord({wire.RUN_ID: str(run_id), wire.SERVER_ROUND: server_round, wire.NODE_ID: str(me),
                         wire.BITS: bits, wire.SHARES: sealed, wire.COMMIT: commit, wire.SIGNATURE: signature})
    return ({wire.MASK_UPDATE: ArrayRecord({wire.WORDS: Array(words)}), wire.MASK: meta},
            {"mask-saturated": saturated, "mask-bits": bits, "mask-threshold": t,
             "mask-pinned": int(STATE_PEERS in context.state)})


def unmask_reply(content: RecordDict, context: Context, cfg: Mapping[str, Any], run_id: int) -> RecordDict:
    """``query.mask_unmask``: this survivor's shares of the other survivors' self masks and this round's
    seeds with the dropped, after its own checks (once a round), else MaskError."""
    me = int(context.node_id)
    keys = run_keys(context)
    if STATE_ROUND not in context.state:
        raise MaskError("this gateway has masked nothing in this run; nothing to unmask")
    state = wire.config_record(context.state, STATE_ROUND)
    try:
        config = wire.config_record(content, "config")
        server_round = wire.as_int(config[wire.SERVER_ROUND])
        survivors = wire.as_ints(config[wire.SURVIVORS])
        dropped = wire.as_ints(config.get(wire.DROPPED, []))
        senders = wire.as_ints(config.get(wire.FROM, []))
        sealed = wire.as_bytes_list(config.get(wire.SHARES, []))
    except (KeyError, TypeError, ValueError, wire.RecordKindError) as err:
        raise MaskError(f"malformed unmask request ({type(err).__name__}: {err}); refused") from None
    if server_round != wire.as_int(state["round"]):
        raise MaskError(f"asked to unmask round {server_round}, this gateway last masked for round "
                        f"{wire.as_int(state['round'])}: replayed or out of turn; refused")
    if bool(state["answered"]):
        raise MaskError(f"this gateway already answered the round-{server_round} unmask request; one a round, refused")
    cohort = Cohort.from_record(state)
    if set(survivors) & set(dropped) or sorted(survivors + dropped) != sorted(cohort.nodes):
        raise MaskError("the survivors and the dropped do not split this round's cohort; refused")
    if me not in survivors:
        raise MaskError("this gateway is listed as dropped in a request sent to it; refused")
    least = min_survivors(cfg, len(cohort.nodes), int(cast(int, context.node_config.get("mask-min-aggregate", 0)) or 0))
    if len(survivors) < least:
        raise MaskError(f"asked to unmask a sum of {len(survivors)} gateway(s); this gateway unmasks only sums of at "
                        f"least {least}; refused")
    if len(senders) != len(sealed) or len(set(senders)) != len(senders) or not set(senders) <= set(survivors) - {me}:
        raise MaskError("the shares sent are not one each from other survivors; refused")
    # answer once: recorded before anything is revealed
    state["answered"] = True
    context.state[STATE_ROUND] = state
    opened_from, opened, unopened = [], [], []
    for src, blob in zip(senders, sealed):
        try:
            opened.append(masking.open_share(keys, cohort.agree[cohort.position(src)], blob, run_id, server_round,
                                             src, me))
            opened_from.append(str(src))
        except MaskError:
            unopened.append(str(src))
    seeds = [masking.pair_seed(keys, cohort.agree[cohort.position(j)], run_id, server_round, me, j) for j in dropped]
    reply: dict[str, Any] = {}
    for key, values in ((wire.FROM, opened_from), (wire.SHARES, opened), (wire.DROPPED, [str(j) for j in dropped]),
                        (wire.SEEDS, seeds), (wire.UNOPENED, unopened)):
        if values:  # Flower's ConfigRecord cannot size an empty list
            reply[key] = values
    return RecordDict({wire.UNMASK: ConfigRecord(reply or {wire.SERVER_ROUND: server_round})})


# -- the server's side -------------------------------------------------------------------------
@dataclass(frozen=True)
class Masked:
    """One gateway's masked contribution after the server's checks."""

    node: int
    words: np.ndarray      # k-bit words as int64
    shares: list[bytes]    # sealed, in cohort order
    commit: bytes


@dataclass
class Unmasked:
    shares: dict[int, bytes]  # owner -> this survivor's opened share of its self mask
    seeds: dict[int, bytes]   # dropped -> this round's pair seed


def unmask_request(parts: list[Masked], members: list[int], node: int, server_round: int,
                   dropped: list[int]) -> RecordDict:
    """What survivor ``node`` is asked: the survivors, the dropped, and the shares sealed for it."""
    me = members.index(node)
    others = [q for q in parts if q.node != node]
    cfg: dict[str, Any] = {wire.SERVER_ROUND: server_round, wire.SURVIVORS: [str(p.node) for p in parts]}
    if dropped:  # Flower's ConfigRecord cannot size an empty list
        cfg[wire.DROPPED] = [str(j) for j in dropped]
    if others:
        cfg[wire.FROM] = [str(q.node) for q in others]
        cfg[wire.SHARES] = [q.shares[me] for q in others]
    return RecordDict({"config": ConfigRecord(cfg)})


def unmask_answer(content: RecordDict) -> Unmasked:
    """A survivor's unmask reply, read and checked for lengths, else MaskError (or KeyError, TypeError)."""
    rec = wire.config_record(content, wire.UNMASK)
    shares = dict(zip(wire.as_ints(rec.get(wire.FROM, [])), wire.as_bytes_list(rec.get(wire.SHARES, []))))
    seeds = dict(zip(wire.as_ints(rec.get(wire.DROPPED, [])), wire.as_bytes_list(rec.get(wire.SEEDS, []))))
    if any(len(s) != masking.SHARE_BYTES for s in shares.values()) or any(
            len(s) != masking.SEED_BYTES for s in seeds.values()):
        raise MaskError("an unmask reply holds a share or seed of the wrong length")
    return Unmasked(shares, seeds)


class MaskFedAvg(SecureSumFedAvg):
    """Secure-sum FedAvg whose uplink is k-bit words under pairwise and self masks (``masking.py``)."""

    def __init__(self, *, threshold: float = 0.5, min_cohort: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.min_cohort = int(min_cohort)
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}  # node -> its public run keys (agree, sign)
        self.vouchers: dict[int, tuple[bytes, bytes]] = {}     # node -> (certificate, proof) for its run keys
        self.introduced: dict[int, set[int]] = {}              # node -> peers whose vouchers it has checked
        self.members: list[int] = []                           # this round's cohort, in order

    # -- key set-up, once a run ----------------------------------------------------------------
    def setup(self, grid: Grid, server_round: int) -> None:
        """Ask every connected gateway whose run keys the server lacks for them (the first round: all)."""
        unknown = sorted(n for n in grid.get_node_ids() if n not in self.public_keys)
        if not unknown:
            return
        messages = [Message(content=RecordDict({"config": ConfigRecord({wire.SERVER_ROUND: server_round})}),
                            dst_node_id=n, message_type=wire.QUERY_MASK_KEYS) for n in unknown]
        for reply in grid.send_and_receive(messages):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(INFO, "gateway %d gave no run keys: %s", node, reply.error.reason)
                continue
            try:
                rec = wire.config_record(reply.content, wire.MASK_KEYS)
                agree, sign = wire.as_bytes(rec[wire.AGREE]), wire.as_bytes(rec[wire.SIGN])
                if len(agree) != masking.KEY_BYTES or len(sign) != masking.KEY_BYTES:
                    raise MaskError(f"run keys of {len(agree)} and {len(sign)} bytes, not {masking.KEY_BYTES}")
            except (KeyError, TypeError, MaskError, wire.RecordKindError) as err:
                log(WARNING, "gateway %d: run keys refused: %s", node, err)
                continue
            if any(agree == a or sign == s for a, s in self.public_keys.values()):
                log(WARNING, "gateway %d: run keys refused: another gateway already holds them", node)
                continue
            self.public_keys[node] = (agree, sign)
            if isinstance(rec.get(wire.CERT), bytes) and isinstance(rec.get(wire.PROOF), bytes):
                self.vouchers[node] = (wire.as_bytes(rec[wire.CERT]), wire.as_bytes(rec[wire.PROOF]))
        log(INFO, "mask key set-up: %d of %d gateway(s) gave run keys", len(set(unknown) & set(self.public_keys)),
            len(unknown))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.setup(grid, server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def cohort(self, server_round: int, messages: list[Message]) -> list[Message]:
        kept = [m for m in messages if m.metadata.dst_node_id in self.public_keys]
        if len(kept) < len(messages):
            log(WARNING, "round %d: %d sampled gateway(s) without run keys wait for the next round", server_round,
                len(messages) - len(kept))
        if len(kept) < self.min_cohort:
            log(WARNING, "round %d: a cohort of %d, fewer than strategy.min_cohort=%d; no round", server_round,
                len(kept), self.min_cohort)
            kept = []
        self.members = sorted(m.metadata.dst_node_id for m in kept)
        return kept

    def train_config(self, server_round: int, nodes: list[int]) -> dict[int, dict[str, Any]]:
        record = Cohort(self.members, [self.public_keys[n][0] for n in self.members],
                        [self.public_keys[n][1] for n in self.members]).record()
        out = {}
        for node in nodes:
            out[node] = dict(record)
            new = [m for m in self.members if m in self.vouchers and m not in self.introduced.get(node, set())]
            if new:  # each peer's certificate and proof once a run: the gateway keeps what it checked
                out[node][wire.MASK_CERTS] = [self.vouchers[m][0] if m in new else b"" for m in self.members]
                out[node][wire.MASK_PROOFS] = [self.vouchers[m][1] if m in new else b"" for m in self.members]
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            reason = (msg.error.reason or "") if msg.has_error() else ""
            if "run keys" in reason or "certificate" in reason:
                # it lost its run state (a restart) or its view of the peers: set up and introduce again
                node = msg.metadata.src_node_id
                self.introduced.pop(node, None)
                if "holds no run keys" in reason or "not this gateway's run keys" in reason:
                    self.public_keys.pop(node, None)
                    self.vouchers.pop(node, None)
        return super().aggregate_train(server_round, replies)

    # -- up --------------------------------------------------------------------------------
    def check(self, msg: Message, server_round: int, size: int) -> Masked:
        """The reply's masked words after every check the server can make, else MaskError."""
        node = msg.metadata.src_node_id
        content = msg.content
        if wire.MASK_UPDATE not in content or wire.MASK not in content:
            if msg.has_content() and "metrics" in content and any(
                    k in content for k in (wire.UPDATE, wire.HE_UPDATE, "arrays")):
                raise MaskError("an unmasked update in the reply (is the gateway running strategy=mask?)")
            raise MaskError("no masked update in the reply")
        if node not in self.members:
            raise MaskError("a reply from a gateway outside this round's cohort")
        meta = wire.config_record(content, wire.MASK)
        claimed = (str(meta.get(wire.RUN_ID)), str(meta.get(wire.SERVER_ROUND)), str(meta.get(wire.NODE_ID)))
        actual = (str(msg.metadata.run_id), str(server_round), str(node))
        if claimed != actual:
            raise MaskError(f"masked update bound to (run, round, node) {claimed}, this reply is {actual}: "
                            "replayed or misdirected")
        bits = masking.bits_for(len(self.members))
        if (sent := wire.as_int(meta[wire.BITS])) != bits:
            raise MaskError(f"{sent}-bit words, a cohort of {len(self.members)} uses {bits}")
        payload = wire.array_record(content, wire.MASK_UPDATE)[wire.WORDS].numpy()
        if payload.dtype != np.uint8 or payload.size != masking.packed_bytes(size, bits):
            raise MaskError(f"{payload.size} bytes of masked words where the model needs "
                            f"{masking.packed_bytes(size, bits)} (malformed or another task)")
        shares, commit = wire.as_bytes_list(meta[wire.SHARES]), wire.as_bytes(meta[wire.COMMIT])
        me = self.members.index(node)
        if len(shares) != len(self.members) or any(
                len(s) != (0 if i == me else masking.SEALED_SHARE_BYTES) for i, s in enumerate(shares)):
            raise MaskError("the sealed shares are not one per other cohort member")
        message = contribution_message(msg.metadata.run_id, server_round, node, bits, payload.tobytes(), shares,
                                       commit, self.members)
        if not masking.verify(self.public_keys[node][1], wire.as_bytes(meta[wire.SIGNATURE]), message):
            raise MaskError("the signature does not verify under this gateway's run key: forged, altered in transit "
                            "or another gateway's contribution")
        self.introduced.setdefault(node, set()).update(self.members)  # it checked every voucher it was sent
        return Masked(node, masking.unpack(payload, size, bits), shares, commit)

    def _unmask_requests(self, parts: list[Masked], server_round: int, dropped: list[int]) -> list[Message]:
        return [Message(content=unmask_request(parts, self.members, p.node, server_round, dropped), dst_node_id=p.node,
                        message_type=wire.QUERY_MASK_UNMASK) for p in parts]

    def secure_sum(self, parts: list[Masked], server_round: int, size: int) -> Decrypted:
        """Unmask the sum of ``parts``: one request to each survivor, then the self masks and the dropped
        pairs' masks removed. ``slots`` None when it cannot be (logged with the reason)."""
        assert self.grid is not None, "unmask before configure_train gave the strategy its grid"
        n = len(self.members)
        nodes = [p.node for p in parts]
        dropped = [m for m in self.members if m not in nodes]
        t = masking.threshold_for(n, self.threshold)
        if len(parts) < masking.min_survivors(n, self.threshold, self.min_aggregate):
            log(WARNING, "round %d: %d masked updates, fewer than t + 1 = %d (a self mask needs t shares from the "
                "other survivors) or strategy.min_aggregate=%d; nothing aggregated", server_round, len(parts), t + 1,
                self.min_aggregate)
            return Decrypted(None, nodes, {})
        answers: dict[int, Unmasked] = {}
        for reply in self.grid.send_and_receive(self._unmask_requests(parts, server_round, dropped)):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise MaskError(reply.error.reason)
                answers[node] = unmask_answer(reply.content)
            except (MaskError, KeyError, TypeError, wire.RecordKindError) as err:
                log(WARNING, "round %d: gateway %d gave no unmask answer: %s", server_round, node, err)
        return self._unmasked(parts, server_round, size, dropped, answers, t)

    def _unmasked(self, parts: list[Masked], server_round: int, size: int, dropped: list[int],
                  answers: dict[int, Unmasked], t: int) -> Decrypted:
        bits = masking.bits_for(len(self.members))
        nodes = [p.node for p in parts]
        silent = [p.node for p in parts if p.node not in answers]
        if dropped and silent:
            log(WARNING, "round %d: survivor(s) %s did not answer the unmask request and %s dropped: their pair masks "
                "cannot be removed; nothing aggregated", server_round, silent, dropped)
            return Decrypted(None, nodes, {})
        total = np.zeros(size, dtype=np.int64)
        for p in parts:
            total += p.words
            shares = [a.shares[p.node] for a in answers.values() if p.node in a.shares][:t]
            if len(shares) < t:
                log(WARNING, "round %d: %d share(s) of gateway %d's self mask, t=%d needed; nothing aggregated",
                    server_round, len(shares), p.node, t)
                return Decrypted(None, nodes, {})
            seed = masking.combine_seed(shares)
            if hashlib.sha256(seed).digest() != p.commit:
                log(WARNING, "round %d: gateway %d's self mask did not rebuild to its commitment (a wrong share); "
                    "nothing aggregated", server_round, p.node)
                return Decrypted(None, nodes, {})
            total -= masking.prg(seed, size, bits)
        for node, answer in answers.items():
            for j in dropped:
                if j not in answer.seeds:
                    log(WARNING, "round %d: gateway %d gave no seed for dropped gateway %d; nothing aggregated",
                        server_round, node, j)
                    return Decrypted(None, nodes, {})
                total -= masking.pair_correction(node, j, answer.seeds[j], size, bits)
        digits = masking.signed(total & ((1 << bits) - 1), bits)
        bound = he.LEVELS * sum(self.weights[n] for n in nodes) + len(nodes)
        if np.abs(digits).max(initial=0) > bound:
            log(WARNING, "round %d: the unmasked sum is out of range (a wrong seed or altered words); nothing "
                "aggregated", server_round)
            return Decrypted(None, nodes, {})
        log(INFO, "round %d: unmasked the sum of %d gateway(s), %d dropped", server_round, len(nodes), len(dropped))
        return Decrypted(digits, nodes, {})


def validate(cfg: Mapping[str, Any]) -> None:
    """strategy=mask: its parameters, the cohort bounds, and the codec it replaces."""
    if cfg["codec"]["name"] != "none":
        raise ConfigError("config: strategy=mask quantises updates itself (int8 steps in k-bit words); use codec=none")
    number(cfg, "strategy.initial_range", 0.0, 1e6, low_open=True)
    number(cfg, "strategy.range_factor", 1.0, 1e6)
    server_step(cfg)
    number(cfg, "strategy.threshold", 0.0, 1.0, low_open=True)
    integer(cfg, "strategy.min_aggregate", 2)
    value = require(cfg, "strategy.min_cohort")
    if isinstance(value, float):
        number(cfg, "strategy.min_cohort", 0.0, 1.0, low_open=True)
    else:
        integer(cfg, "strategy.min_cohort", 3)
    cohort = expected_cohort(cfg)
    if cohort > masking.MAX_COHORT:
        raise ConfigError(f"config: strategy=mask masks for at most {masking.MAX_COHORT} gateways a round; set "
                          f"fleet.clients_per_round <= {masking.MAX_COHORT}")
    least = min_cohort(cfg)
    if cohort < least:
        raise ConfigError(f"config: strategy=mask needs a cohort of at least {least} gateways (strategy.min_cohort), "
                          f"the fleet samples {cohort}; raise fleet.gateways or lower strategy.min_cohort (>= 3)")


def build(cfg: Mapping[str, Any], ctx: BuildContext) -> MaskFedAvg:
    st = cfg["strategy"]
    return MaskFedAvg(threshold=float(st["threshold"]), min_cohort=min_cohort(cfg),
                      initial_range=float(st["initial_range"]), range_factor=float(st["range_factor"]),
                      min_aggregate=int(st["min_aggregate"]), dp=ctx.dp, **server_step(cfg), **ctx.common)


SPEC = StrategySpec(
    name="mask", build=build,
    extra_exchanges=1, validate=validate, uplink="masked", client_dp="distributed",
    describe="model update, {noise}int8-quantised, masked in k-bit words (pairwise X25519 masks and a Shamir-shared "
             "self mask); after the round, shares of other survivors' self masks and this round's pair seeds with "
             "gateways that dropped out; the server unmasks only the sum of at least strategy.min_aggregate gateways",
    device_update=masked_update,
)
