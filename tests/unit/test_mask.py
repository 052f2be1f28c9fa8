"""Masked aggregation (strategy=mask): words, PRG, shares, and the unmasked sum against plaintext FedAvg
with uneven example counts and dropouts; bad contributions named and left out (real X25519, Ed25519,
AES-GCM, ChaCha20 and Shamir from cryptography / pycryptodome)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from iiotfl.configs import ConfigError, compose
from iiotfl.strategies import he, masking, validate_strategy, wire
from iiotfl.strategies.codecs import flatten
from iiotfl.strategies.mask_fedavg import unmask_reply
from iiotfl.strategies.masking import MaskError
from tests.maskfleet import SIZE, VIEW, MaskFleet


@pytest.mark.parametrize("bits", [9, 12, 15, 16])
def test_words_pack_to_k_bits_and_back(bits):
    rng = np.random.default_rng(bits)
    words = rng.integers(0, 1 << bits, 1001)
    packed = masking.pack(words, bits)
    assert packed.size == masking.packed_bytes(1001, bits)
    assert np.array_equal(masking.unpack(packed, 1001, bits), words)


def test_bits_leave_room_for_the_cohorts_sum():
    assert masking.bits_for(10) == 12 and masking.bits_for(2) == 10 and masking.bits_for(128) == 16
    for n in (3, 10, 64, 128):
        assert 2 * he.LEVELS * n < 1 << masking.bits_for(n)
    with pytest.raises(MaskError, match="1 to 128"):
        masking.bits_for(129)


def test_threshold_shares_rebuild_the_seed_and_fewer_do_not():
    seed = masking.fresh_seed()
    shares = masking.split_seed(seed, 4, 7)
    assert all(len(s) == masking.SHARE_BYTES for s in shares)
    assert masking.combine_seed(shares[2:6]) == seed
    assert masking.combine_seed(shares) == seed
    assert masking.combine_seed(shares[:3]) != seed


def test_pairwise_masks_cancel_and_the_self_mask_hides_the_values():
    bits, size = 12, 5000
    keys = {n: masking.RunKeys.generate() for n in (3, 5, 9)}
    values = {n: np.random.default_rng(n).integers(-127, 128, size) for n in keys}
    seeds = {n: masking.fresh_seed() for n in keys}
    words = {}
    for n, k in keys.items():
        pairs = {p: masking.pair_seed(k, keys[p].agree_public, 1, 2, n, p) for p in keys if p != n}
        assert all(masking.pair_seed(keys[p], k.agree_public, 1, 2, p, n) == s for p, s in pairs.items())
        words[n] = masking.mask(values[n], bits, seeds[n], pairs, n)
    total = sum(words.values()) - sum(masking.prg(s, size, bits) for s in seeds.values())
    assert np.array_equal(masking.signed(total & 4095, bits), sum(values.values()))
    # one gateway's words alone look uniform: a sign guess from them is at chance
    guess = masking.signed(words[3], bits) > 0
    assert abs(np.mean(guess == (values[3] > 0)) - 0.5) < 0.03


def test_a_share_opens_only_for_its_run_round_and_pair():
    a, b, c = (masking.RunKeys.generate() for _ in range(3))
    sealed = masking.seal_share(a, b.agree_public, b"x" * masking.SHARE_BYTES, 1, 4, 10, 20)
    assert len(sealed) == masking.SEALED_SHARE_BYTES
    assert masking.open_share(b, a.agree_public, sealed, 1, 4, 10, 20) == b"x" * masking.SHARE_BYTES
    for args in ((b, a, 1, 5, 10, 20), (b, a, 2, 4, 10, 20), (c, a, 1, 4, 10, 20), (b, a, 1, 4, 11, 20)):
        key, peer, *rest = args
        with pytest.raises(MaskError, match="does not open"):
            masking.open_share(key, peer.agree_public, sealed, *rest)


def _updates(nodes, seed):
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, 0.006, SIZE) for n in nodes}


@pytest.mark.parametrize("drop", [0, 1, 3])  # 0%, 10% and 30% of a cohort of 10
def test_the_unmasked_sum_is_weighted_fedavg_within_the_bound(drop, tmp_path, serverapp_identity):
    nodes = list(range(101, 111))
    fleet = MaskFleet(nodes, tmp_path)
    strategy = fleet.strategy()
    counts = {n: 10 + 37 * i for i, n in enumerate(nodes)}  # uneven example counts
    strategy.counts = dict(counts)
    msgs = fleet.configure(strategy, 1)
    assert sorted(msgs) == nodes and sum(t == wire.QUERY_MASK_KEYS for t, _ in fleet.log) == 10
    updates = _updates(nodes, drop)
    dropped = nodes[1:1 + drop]  # trained, never replied
    replies = [fleet.reply(msgs[n], updates[n], counts[n]) for n in nodes if n not in dropped]
    fleet.dead = set(dropped)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.current == set(nodes) - set(dropped)
    got = flatten({k: v.numpy() for k, v in arrays.items()})
    kept = [n for n in nodes if n not in dropped]
    w = {n: strategy.weights[n] for n in kept}
    expected = sum(w[n] * np.clip(updates[n], -0.02, 0.02) for n in kept) / sum(w.values())
    bound = he.error_bound(np.full(SIZE, 0.02), len(kept), sum(w.values()))[0]
    assert np.abs(got - expected).max() <= bound + 1e-7
    assert np.abs(got - expected).max() > 0  # quantised, not a copy of the plaintext
    unmasks = [n for t, n in fleet.log if t == wire.QUERY_MASK_UNMASK]
    assert sorted(unmasks) == kept  # one extra exchange, survivors only

    # round 2: the keys are not set up again; one more unmask exchange only
    fleet.dead, fleet.log = set(), []
    msgs = fleet.configure(strategy, 2)
    assert not any(t == wire.QUERY_MASK_KEYS for t, _ in fleet.log)
    arrays, _ = strategy.aggregate_train(2, [fleet.reply(m, updates[n], counts[n]) for n, m in msgs.items()])
    assert arrays is not None and strategy.current == set(nodes)


def test_the_server_step_moves_by_server_lr_times_its_momentum_of_the_unmasked_mean(tmp_path, serverapp_identity):
    """strategy.server_lr / server_momentum: FedAvgM's step on the unmasked mean, round by round."""
    nodes = list(range(101, 106))
    fleet = MaskFleet(nodes, tmp_path, ("strategy.server_lr=2", "strategy.server_momentum=0.5"))
    strategy = fleet.strategy()
    counts = {n: 10 for n in nodes}
    strategy.counts = dict(counts)
    means, got = [], []
    for rnd in (1, 2):
        msgs = fleet.configure(strategy, rnd)  # every round starts from VIEW (zeros): the result is the step
        updates = _updates(nodes, rnd)
        arrays, _ = strategy.aggregate_train(rnd, [fleet.reply(m, updates[n], counts[n]) for n, m in msgs.items()])
        ranges = np.concatenate([np.full(v.size, r) for v, r in zip(VIEW.values(), strategy.sent_ranges)])
        means.append(sum(np.clip(updates[n], -ranges, ranges) for n in nodes) / len(nodes))
        got.append(flatten({k: v.numpy() for k, v in arrays.items()}))
    bound = he.error_bound(np.full(SIZE, max(strategy.sent_ranges)), len(nodes), float(len(nodes)))[0]
    assert np.abs(got[0] - 2 * means[0]).max() <= 2 * bound + 1e-7  # v1 = mean1; step 2 v1
    assert np.abs(got[1] - 2 * (0.5 * means[0] + means[1])).max() <= 3 * bound + 1e-7  # v2 = 0.5 v1 + mean2
    assert np.abs(got[1] - means[1]).max() > 10 * bound  # not FedAvg's step


def test_bad_contributions_are_named_and_the_round_completes(tmp_path, serverapp_identity, caplog):
    nodes = list(range(1, 9))
    fleet = MaskFleet(nodes, tmp_path)
    strategy = fleet.strategy()
    msgs = fleet.configure(strategy, 1)
    updates = _updates(nodes, 7)
    replies = {n: fleet.reply(msgs[n], updates[n]) for n in nodes}
    # 2: malformed (words cut short); 3: words altered in transit; 4: another gateway's contribution sent as its own
    cut = replies[2].content[wire.MASK_UPDATE][wire.WORDS].numpy()[:-5]
    replies[2].content[wire.MASK_UPDATE] = ArrayRecord({wire.WORDS: Array(cut)})
    flipped = replies[3].content[wire.MASK_UPDATE][wire.WORDS].numpy().copy()
    flipped[7] ^= 1
    replies[3].content[wire.MASK_UPDATE] = ArrayRecord({wire.WORDS: Array(flipped)})
    foreign = Message(RecordDict({k: v for k, v in replies[5].content.items()}), reply_to=msgs[4])
    replies[4] = foreign
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, list(replies.values()))
    assert set(strategy.rejected) == {2, 3, 4}
    assert "bytes of masked words where the model needs" in strategy.rejected[2]
    assert "signature does not verify" in strategy.rejected[3]
    assert "bound to (run, round, node)" in strategy.rejected[4]
    assert "gateway 4" in caplog.text
    kept = [1, 5, 6, 7, 8]
    got = flatten({k: v.numpy() for k, v in arrays.items()})
    expected = np.mean([np.clip(updates[n], -0.02, 0.02) for n in kept], axis=0)
    assert np.abs(got - expected).max() <= he.error_bound(np.full(SIZE, 0.02), 5, 5.0)[0] + 1e-7

    # round 2: a round-1 contribution replayed is named and left out; the others aggregate
    msgs2 = fleet.configure(strategy, 2)
    round2 = [fleet.reply(msgs2[n], updates[n]) for n in nodes if n != 6]
    replayed = Message(RecordDict({k: v for k, v in replies[6].content.items()}), reply_to=msgs2[6])
    arrays, _ = strategy.aggregate_train(2, [*round2, replayed])
    assert set(strategy.rejected) == {6} and "replayed or misdirected" in strategy.rejected[6]
    assert arrays is not None and strategy.current == set(nodes) - {6}


def test_a_gateway_answers_one_unmask_request_a_round_and_checks_it(tmp_path, serverapp_identity):
    nodes = list(range(1, 7))
    fleet = MaskFleet(nodes, tmp_path, ("strategy.min_cohort=4",))
    strategy = fleet.strategy()
    msgs = fleet.configure(strategy, 1)
    for n, m in msgs.items():
        fleet.reply(m, np.zeros(SIZE))
    ctx, cfg = fleet.contexts[1], fleet.cfg

    def ask(survivors, dropped=(), server_round=1):
        conf = {wire.SERVER_ROUND: server_round, wire.SURVIVORS: [str(n) for n in survivors]}
        if dropped:
            conf[wire.DROPPED] = [str(n) for n in dropped]
        return unmask_reply(RecordDict({"config": ConfigRecord(conf)}), ctx, cfg, 1)

    # a cohort of 6: t = 3, and a survivor's self mask needs t shares from the others: 4 survivors
    with pytest.raises(MaskError, match="unmasks only sums of at least 4"):
        ask([1, 2, 3], [4, 5, 6])
    with pytest.raises(MaskError, match="listed as dropped"):
        ask([2, 3, 4, 5], [1, 6])
    with pytest.raises(MaskError, match="do not split this round's cohort"):
        ask([1, 2, 3, 4], [5])
    with pytest.raises(MaskError, match="asked to unmask round 2"):
        ask([1, 2, 3, 4], [5, 6], server_round=2)
    answer = ask([1, 2, 3, 4], [5, 6])
    assert len(answer[wire.UNMASK][wire.SEEDS]) == 2
    with pytest.raises(MaskError, match="already answered the round-1 unmask request"):
        ask(nodes)  # the other half of a split: j "survived" after all
    # a round-1 train message replayed after round 1: refused
    with pytest.raises(MaskError, match="rounds only move forward"):
        fleet.reply(msgs[1], np.zeros(SIZE))


def test_a_gateway_refuses_a_small_cohort_or_keys_not_its_own(tmp_path, serverapp_identity):
    nodes = list(range(1, 11))
    fleet = MaskFleet(nodes, tmp_path)
    strategy = fleet.strategy()
    msgs = fleet.configure(strategy, 1)
    config = wire.config_record(msgs[1].content, "config")
    small = ConfigRecord(dict(config))
    for key in (wire.MASK_NODES, wire.MASK_AGREE, wire.MASK_SIGN):
        small[key] = list(config[key])[:4]
    with pytest.raises(MaskError, match="masks only for 7 to 128"):
        fleet.reply(Message(RecordDict({**msgs[1].content, "config": small}), dst_node_id=1,
                            message_type="train"), np.zeros(SIZE))
    swapped = ConfigRecord(dict(config))
    agree = list(config[wire.MASK_AGREE])
    agree[0] = masking.RunKeys.generate().agree_public  # the server hands gateway 1 a key of its own making
    swapped[wire.MASK_AGREE] = agree
    with pytest.raises(MaskError, match="not this gateway's run keys"):
        fleet.reply(Message(RecordDict({**msgs[1].content, "config": swapped}), dst_node_id=1,
                            message_type="train"), np.zeros(SIZE))


def test_config_checks():
    validate_strategy(compose(["strategy=mask", "fleet.gateways=10"]))
    with pytest.raises(ConfigError, match="use codec=none"):
        validate_strategy(compose(["strategy=mask", "codec=int8"]))
    with pytest.raises(ConfigError, match="cohort of at least 3"):
        validate_strategy(compose(["strategy=mask", "fleet.gateways=2"]))
    with pytest.raises(ConfigError, match="strategy.threshold"):
        validate_strategy(compose(["strategy=mask", "strategy.threshold=1.5"]))


def test_bytes_per_value_are_a_third_of_float32_for_ten_gateways():
    assert masking.packed_bytes(1_000_000, masking.bits_for(10)) / (4 * 1_000_000) == 0.375
    assert VIEW  # the harness' model


def test_the_tls_fleet_gives_every_gateway_its_identity_for_its_run_keys(tmp_path):
    """The local fleet (TLS) passes each gateway its certificate from the fleet's CA; `iiotfl gateway` turns
    it into the identity node config strategy=mask pins peers' run keys with."""
    from flwr.app import Context

    from iiotfl.compat.flower import parse_config_args, supernode_parser
    from iiotfl.server.launch import Deployment
    from iiotfl.strategies.mask_fedavg import identity
    from tests.conftest import supernode_argv

    dep = Deployment(compose(["fleet.gateways=3", "strategy=mask"]), tmp_path)
    dep.certs = dep.provision_certs()  # what start() does before the gateways, without starting anything
    seen = set()
    for i in range(3):
        config = parse_config_args([supernode_parser().parse_args(supernode_argv(dep, i, "127.0.0.1:1")[1:])
                                    .node_config])
        me = identity(Context(run_id=1, node_id=i, node_config=config, state=RecordDict(), run_config={}))
        assert me is not None and me.cert.subject.rfc4514_string().startswith(f"CN=gateway-{i}")
        seen.add(me.fingerprint)
    assert len(seen) == 3
    with pytest.raises(MaskError, match="set all three"):
        identity(Context(run_id=1, node_id=0, node_config={"identity-cert": "x"}, state=RecordDict(), run_config={}))
