"""strategy=he: the decrypting gateway is no oracle for a curious or malicious server.

Each test replays one attack against the real code paths (the ClientApp's HE handlers with a
Flower Context per gateway, HEFedAvg, the round-0 statistics, real SEAL ciphertexts), asserts
the refusal, and asserts that legitimate aggregation still gives the right sum."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from iiotfl.clients import app
from iiotfl.configs import compose, from_run_config, to_run_config
from iiotfl.server.statistics import federated_feature_sums
from iiotfl.strategies import he, wire
from iiotfl.strategies.codecs import flatten, get_codec
from iiotfl.strategies.he_fedavg import Contribution, HEFedAvg, contribution, decrypt_request, decrypt_sum, digest
from iiotfl.tasks.moments import centre_of, recentre

RUN = 2**63 + 7  # Flower's run and node ids are uint64: the binding carries them as strings
VIEW = {"a": np.zeros((40, 500), np.float32), "b": np.zeros(300, np.float32)}  # 20,300 values: 2 ciphertexts
RANGE = 0.02


@pytest.fixture(scope="module")
def keydir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("he")
    he.KeySet.generate().write(d)
    return d


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> he.KeySet:
    """Another fleet's device key set (same parameters, other keys)."""
    d = tmp_path_factory.mktemp("stranger")
    he.KeySet.generate().write(d)
    return he.KeySet.load(d / he.DEVICE_FILE)


def _reply(node: int, content: RecordDict, message_type: str = "train") -> Message:
    meta = Metadata(run_id=RUN, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="", created_at=0.0, ttl=60.0, message_type=message_type)
    return Message(metadata=meta, content=content)


class Fleet:
    """Gateways running the ClientApp's own HE code, one Flower Context each (``context.state`` kept between
    messages, as the SuperNode keeps it per run); also the grid the server reaches them through."""

    def __init__(self, keydir: Path, tmp_path: Path, nodes, *overrides: str) -> None:
        run_config = to_run_config(compose(["strategy=he", f"strategy.keys={keydir}", *overrides]), tmp_path)
        self.settings = from_run_config(run_config)
        self.keys = he.KeySet.load(keydir / he.DEVICE_FILE)
        self.server_keys = he.KeySet.load(keydir / he.SERVER_FILE)
        self.contexts = {n: Context(run_id=RUN, node_id=n, node_config={"he-key": str(keydir / he.DEVICE_FILE)},
                                    state=RecordDict(), run_config=run_config) for n in nodes}
        self.stats_replies: dict[int, Message] = {}
        self.centred: dict[int, np.ndarray] = {}  # what each gateway sends in the second pass
        self.asked: list[tuple[str, int]] = []

    # -- the gateways ------------------------------------------------------------------
    def stats(self, node: int, sums: np.ndarray, kind: str = wire.HE_KIND_STATS) -> Message:
        """A gateway's reply to the round-0 statistics query (``feature_stats``' HE branch; ``kind``: its pass)."""
        gateway = MetricRecord({"partition": node % 100, wire.NUM_EXAMPLES: 10, wire.ROWS: sums.shape[0],
                                wire.COLS: sums.shape[1]})
        records = app._he_stats(self.settings, self.contexts[node], sums, kind)
        return _reply(node, RecordDict({**records, wire.GATEWAY: gateway}), wire.QUERY_FEATURE_STATS)

    def update(self, node: int, update: np.ndarray, server_round: int) -> Message:
        """A gateway's train reply (``train``'s HE branch: quantise, encrypt, bind, remember)."""
        config = ConfigRecord({wire.SERVER_ROUND: server_round, wire.HE_FINGERPRINT: self.keys.fingerprint,
                               wire.HE_RANGES: [RANGE] * len(VIEW), wire.HE_WEIGHT: 1.0})
        records, _ = app._he_update(self.settings, self.contexts[node], config, update, VIEW,
                                    np.random.default_rng([node, server_round]))
        metrics = MetricRecord({wire.NUM_EXAMPLES: 10, "partition": node % 100})
        return _reply(node, RecordDict({**records, "metrics": metrics}))

    def decrypt(self, node: int, content: RecordDict) -> Message:
        """The server's ``query.he_decrypt`` to ``node``, answered by the ClientApp's handler (raises on refusal)."""
        msg = Message(content=content, dst_node_id=node, message_type=wire.QUERY_HE_DECRYPT)
        return app.he_decrypt(msg, self.contexts[node])

    # -- the grid ----------------------------------------------------------------------
    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def sender(self, reply: Message) -> int:
        return reply.metadata.src_node_id

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.asked.append((msg.metadata.message_type, node))
            if msg.metadata.message_type == wire.QUERY_FEATURE_STATS:
                second = wire.NORM_CENTRE in msg.content["config"]
                out.append(self.stats(node, self.centred[node], wire.HE_KIND_CENTRED) if second
                           else self.stats_replies[node])
                continue
            try:
                out.append(app.he_decrypt(msg, self.contexts[node]))
            except Exception as err:  # what the SuperNode sends back for a ClientApp that raised
                out.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"),
                                   reply_to=msg))
        return out


def _strategy(fleet: Fleet, keydir: Path, nodes) -> HEFedAvg:
    strategy = HEFedAvg(keys=keydir / he.SERVER_FILE, codec=get_codec(None), fraction_train=1.0,
                        min_available_nodes=1)
    strategy.view, strategy.sent_ranges, strategy.grid = VIEW, [RANGE] * len(VIEW), fleet
    strategy.weights = {n: 1.0 for n in nodes}
    return strategy


def _updates(nodes, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, 0.005, flatten(VIEW).size) for n in nodes}


def _assert_mean_of(arrays, updates: dict[int, np.ndarray], nodes) -> None:
    """The aggregate is the mean of exactly these gateways' clipped updates (within the quantisation bound)."""
    got = flatten({k: v.numpy() for k, v in arrays.items()})
    expected = sum(np.clip(updates[n], -RANGE, RANGE) for n in nodes) / len(nodes)
    assert np.abs(got - expected).max() <= he.error_bound(np.array([RANGE]), len(nodes), len(nodes))[0] + 1e-7


def _stats_parts(fleet: Fleet, sums: dict[int, np.ndarray]) -> dict[int, Contribution]:
    expected = he.limb_ciphertext_count(next(iter(sums.values())).size)
    return {n: contribution(fleet.stats(n, s), wire.STATS_HE, wire.HE_KIND_STATS, wire.STATS_ROUND,
                            fleet.server_keys, expected) for n, s in sums.items()}


def _tamper(payload: bytes, at: int = 1000) -> bytes:
    """The payload with the lowest bit of one byte flipped (a coefficient changes by one)."""
    return payload[:at] + bytes([payload[at] ^ 0x01]) + payload[at + 1:]


# -- 1. a forged "sum of three" that is one plant's ciphertext --------------------------------
def test_one_plants_statistics_passed_off_as_a_sum_of_three_is_refused(keydir, tmp_path, serverapp_identity):
    fleet = Fleet(keydir, tmp_path, [1, 2, 3], "strategy.min_aggregate=3")
    sums = {n: np.array([[1234.5 * n, 6.02e6, -17.25 * n]]) for n in (1, 2, 3)}
    parts = _stats_parts(fleet, sums)
    a = parts[1]

    # the reproduced attack: plant 1's ciphertext alone, the request claiming 3 contributors and a minimum of 1
    forged = decrypt_request([a], 0, wire.HE_KIND_STATS, fleet.server_keys)
    forged["config"][wire.CONTRIBUTORS], forged["config"][wire.MIN_AGGREGATE] = 3, 1
    with pytest.raises(he.HEError, match=r"sum of 1 contribution\(s\); this gateway decrypts only sums of at least 3"):
        fleet.decrypt(1, forged)
    # plant 1's bytes listed as three gateways' contributions: the other two tags do not bind these bytes
    relabelled = [Contribution(n, a.payload, parts[n].tag) for n in (1, 2, 3)]
    refusal = fleet.decrypt(1, decrypt_request(relabelled, 0, wire.HE_KIND_STATS, fleet.server_keys))
    assert wire.SLOTS not in refusal.content
    assert refusal.content[wire.REFUSED][wire.NODES] == ["2", "3"]

    # the same gateway still decrypts the real sum of three, exactly, and no more
    decrypted = decrypt_sum(fleet, list(parts.values()), 0, wire.HE_KIND_STATS, fleet.server_keys, 3)
    assert decrypted.nodes == [1, 2, 3] and not decrypted.refused
    total = he.from_limbs(decrypted.slots, 3, 3)
    assert np.allclose(total, sum(sums.values()).ravel(), rtol=0, atol=3 * 2.0**-20)

    # ... and again in a later round, once plant 1 trained round 1: the round-0 sum as it was, or relabelled
    fleet.update(1, _updates([1], 0)[1], 1)
    for server_round, kind in ((0, wire.HE_KIND_STATS), (1, wire.HE_KIND_STATS)):
        with pytest.raises(he.HEError, match=f"round-{server_round} stats sum, this gateway's current contribution is "
                                             "round 1's update: replayed or out of turn"):
            fleet.decrypt(1, decrypt_request(list(parts.values()), server_round, kind, fleet.server_keys))
    with pytest.raises(he.HEError, match="own round-1 contribution is not in the sum"):
        fleet.decrypt(1, decrypt_request(list(parts.values()), 1, wire.HE_KIND_UPDATE, fleet.server_keys))


# -- 2. a second decrypt request in the same round ------------------------------------------------
def test_a_second_decrypt_request_in_the_same_round_is_refused(keydir, tmp_path, serverapp_identity):
    nodes = [1, 2, 3]
    fleet = Fleet(keydir, tmp_path, nodes)
    strategy = _strategy(fleet, keydir, nodes)
    updates = _updates(nodes, 1)
    replies = [fleet.update(n, updates[n], 1) for n in nodes]
    arrays, _ = strategy.aggregate_train(1, replies)
    _assert_mean_of(arrays, updates, nodes)
    assert fleet.asked == [(wire.QUERY_HE_DECRYPT, 1)]

    parts = [strategy.check(r, 1, flatten(VIEW).size) for r in replies]
    for subset in (parts, parts[:2]):  # the same sum again, or a subset whose difference would be plant 3's update
        with pytest.raises(he.HEError, match="already decrypted the round-1 update sum; one a round"):
            fleet.decrypt(1, decrypt_request(subset, 1, wire.HE_KIND_UPDATE, fleet.server_keys))


# -- 3. a round-1 ciphertext replayed in round 2 ------------------------------------------------------
def test_a_replayed_round_1_ciphertext_is_refused_in_round_2(keydir, tmp_path, serverapp_identity, caplog):
    nodes = [1, 2, 3]
    fleet = Fleet(keydir, tmp_path, nodes)
    strategy = _strategy(fleet, keydir, nodes)
    first, second = _updates(nodes, 2), _updates(nodes, 3)
    round1 = {n: fleet.update(n, first[n], 1) for n in nodes}
    arrays, _ = strategy.aggregate_train(1, list(round1.values()))
    _assert_mean_of(arrays, first, nodes)

    round2 = [fleet.update(1, second[1], 2), fleet.update(2, second[2], 2)]
    expected = he.ciphertext_count(flatten(VIEW).size)
    # a server that skips its own check: the decrypting gateway finds plant 3's round-1 binding
    replayed = contribution(round1[3], wire.HE_UPDATE, wire.HE_KIND_UPDATE, 1, fleet.server_keys, expected)
    fresh = [strategy.check(r, 2, flatten(VIEW).size) for r in round2]
    refusal = fleet.decrypt(1, decrypt_request([*fresh, replayed], 2, wire.HE_KIND_UPDATE, fleet.server_keys))
    assert refusal.content[wire.REFUSED][wire.NODES] == ["3"] and wire.SLOTS not in refusal.content
    # the server itself drops the replay, names the gateway, and round 2 goes on without it
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(2, [*round2, round1[3]])
    assert set(strategy.rejected) == {3} and "bound to (kind, run, round, node)" in strategy.rejected[3]
    assert fleet.asked == [(wire.QUERY_HE_DECRYPT, 1)] * 2  # round 1's, then round 2's without plant 3
    assert "update of gateway 3 (partition 3) left out" in caplog.text
    _assert_mean_of(arrays, second, [1, 2])
    assert strategy.current == {1, 2}


# -- 4. a ciphertext under another key ----------------------------------------------------------------
def test_a_ciphertext_under_another_key_is_dropped_by_name_and_the_round_goes_on(keydir, tmp_path, stranger,
                                                                                  serverapp_identity, caplog):
    nodes = [11, 12, 13, 14]
    fleet = Fleet(keydir, tmp_path, nodes)
    strategy = _strategy(fleet, keydir, nodes)
    updates = _updates(nodes, 4)
    replies = [fleet.update(n, updates[n], 1) for n in (11, 12)]
    for n in (13, 14):  # a gateway holding another fleet's device.he, binding with its own key as the code does
        payload, _ = he.encrypt_update(stranger, updates[n], np.full(updates[n].size, RANGE), 1.0,
                                       np.random.default_rng(n))
        records = app._encrypted(payload, stranger, wire.HE_UPDATE, fleet.contexts[n], wire.HE_KIND_UPDATE, 1,
                                 updates[n].size)
        if n == 14:  # ... and claiming the fleet's fingerprint: nothing the server can see tells it apart
            records[wire.HE][wire.FINGERPRINT] = fleet.keys.fingerprint
        replies.append(_reply(n, RecordDict({**records, "metrics": MetricRecord({"partition": n % 100})})))
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert set(strategy.rejected) == {13, 14}
    assert "key set" in strategy.rejected[13]  # at the server: the fingerprint
    assert "not bound to this run and round 1" in strategy.rejected[14]  # at the decrypting gateway: the binding
    assert "gateway 13 (partition 13) left out" in caplog.text and "gateway 14 (partition 14) left out" in caplog.text
    _assert_mean_of(arrays, updates, [11, 12])
    assert strategy.current == {11, 12}
    assert fleet.asked == [(wire.QUERY_HE_DECRYPT, 11)] * 2  # named 14, then decrypted the rest


# -- 5. a flipped bit --------------------------------------------------------------------------------
def test_a_flipped_bit_is_dropped_by_name_and_the_round_goes_on(keydir, tmp_path, serverapp_identity, caplog):
    nodes = [21, 22, 23, 24]
    fleet = Fleet(keydir, tmp_path, nodes)
    strategy = _strategy(fleet, keydir, nodes)
    updates = _updates(nodes, 5)
    replies = [fleet.update(n, updates[n], 1) for n in nodes]
    for reply, fix_digest in ((replies[2], False), (replies[3], True)):
        record = reply.content[wire.HE_UPDATE]
        payload = _tamper(record[wire.CT].numpy().tobytes())
        record[wire.CT] = Array(np.frombuffer(payload, np.uint8))
        if fix_digest:  # a relay that also rewrites the digest: it cannot rewrite the tag
            reply.content[wire.HE][wire.DIGEST] = digest(payload)
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert set(strategy.rejected) == {23, 24}
    assert "do not match their digest" in strategy.rejected[23]
    assert "gateway(s) 24 not bound" in strategy.rejected[24]
    assert "gateway 23 (partition 23)" in caplog.text and "gateway 24 (partition 24)" in caplog.text
    _assert_mean_of(arrays, updates, [21, 22])


# -- 6. an extra or malformed contribution in round 0 ---------------------------------------------------
def test_an_extra_or_malformed_statistics_contribution_is_dropped_in_round_0(keydir, tmp_path, serverapp_identity,
                                                                              caplog):
    nodes = [1, 2, 3, 4, 5, 6]
    fleet = Fleet(keydir, tmp_path, nodes)
    sums = {n: np.array([[10.0 * n, 2.5e3 + n, 7.0], [n / 8, -n, 3.0 + n]]) for n in nodes}  # (n, Σx, M2) rows
    fleet.stats_replies = {n: fleet.stats(n, sums[n]) for n in nodes}
    fleet.centred = sums  # second pass: what each sends about the fleet's centre
    # gateway 4: one ciphertext more than its statistics need, honestly bound (a gateway that pads its reply)
    longer = fleet.keys.encrypt_slots(np.concatenate([he.to_limbs(sums[4]), np.zeros(he.POLY_DEGREE, np.int64)]))
    records = app._encrypted(longer, fleet.keys, wire.STATS_HE, fleet.contexts[4], wire.HE_KIND_STATS, 0, 4)
    fleet.stats_replies[4] = _reply(4, RecordDict({**records, wire.GATEWAY: fleet.stats_replies[4].content[wire.GATEWAY]}),
                                    wire.QUERY_FEATURE_STATS)
    # gateway 5: its ciphertext truncated (digest rewritten to match); gateway 6: no binding at all
    record = fleet.stats_replies[5].content[wire.STATS_HE]
    cut = record[wire.CT].numpy().tobytes()[:-7]
    record[wire.CT] = Array(np.frombuffer(cut, np.uint8))
    fleet.stats_replies[5].content[wire.HE][wire.DIGEST] = digest(cut)
    del fleet.stats_replies[6].content[wire.HE][wire.TAG]
    with caplog.at_level(logging.WARNING):
        total, partitions, nbytes, examples = federated_feature_sums(fleet, nodes, timeout=30, keys=fleet.server_keys)
    for n, why in ((4, "2 ciphertexts where the model needs 1"), (5, "not a whole number"), (6, "no binding tag")):
        assert f"gateway {n} (partition {n}): statistics left out" in caplog.text and why in caplog.text
    assert set(partitions) == set(nbytes) == set(examples) == {1, 2, 3}
    honest = sums[1] + sums[2] + sums[3]
    assert np.allclose(total, recentre(honest, centre_of(honest)), rtol=0, atol=3 * 2.0**-20)
    # two passes, each decrypted once, by a gateway of the sum; the second asks only those of the first
    assert [n for t, n in fleet.asked if t == wire.QUERY_FEATURE_STATS] == [1, 2, 3, 4, 5, 6, 1, 2, 3]
