"""strategy=mask under attack: a server colluding with gateways tries to read one plant's update.

The cohort is 10 gateways, t = 5. The target's update is a known sign pattern; the attacker's
best estimate of it from everything it holds (every message, the colluders' run keys and the
shares sealed for them, every unmask answer it can get) is scored by how many signs it gets
right: at chance (≈ 0.5) the update is hidden; the same attack with t colluders gets every sign,
so the test can tell the difference.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from iiotfl.clients.app import mask_unmask
from iiotfl.strategies import masking, wire
from iiotfl.strategies.mask_fedavg import Masked, run_keys, unmask_answer
from iiotfl.strategies.masking import MaskError
from tests.maskfleet import RUN, SIZE, MaskFleet

NODES = list(range(1, 11))
TARGET = 10
T = 5


@pytest.fixture
def round1(tmp_path, serverapp_identity):
    """One round every gateway took part in: the fleet, the server's strategy, the checked contributions,
    and the target's known update (±0.01: its quantised values are about ±64)."""
    fleet = MaskFleet(NODES, tmp_path)
    strategy = fleet.strategy()
    msgs = fleet.configure(strategy, 1)
    signs = np.random.default_rng(42).choice([-1.0, 1.0], SIZE)
    updates = {n: (0.01 * signs if n == TARGET else np.random.default_rng(n).normal(0, 0.005, SIZE)) for n in NODES}
    parts = {n: strategy.check(fleet.reply(msgs[n], updates[n]), 1, SIZE) for n in NODES}
    return fleet, strategy, parts, signs


def _answers(fleet, strategy, parts, survivors, dropped, to):
    """What the honest gateways ``to`` answer an unmask request that names ``survivors`` and ``dropped``."""
    requests = strategy._unmask_requests([parts[n] for n in survivors], 1, dropped)
    out = {}
    for msg in requests:
        node = msg.metadata.dst_node_id
        if node in to:
            reply = mask_unmask(msg, fleet.contexts[node])
            answer = unmask_answer(reply.content)
            out[node] = (answer.shares, answer.seeds)
    return out


def _attack(fleet, strategy, target: Masked, colluders, answers) -> np.ndarray:
    """The coalition's best estimate of the target's quantised update."""
    bits = masking.bits_for(len(NODES))
    estimate = target.words.copy()
    # the self mask: shares the honest answers gave, and those sealed for the colluders, which they open
    shares = [s[TARGET] for s, _ in answers.values() if TARGET in s]
    agree = dict(zip(strategy.members, (strategy.public_keys[n][0] for n in strategy.members)))
    for c in colluders:
        keys = run_keys(fleet.contexts[c])
        sealed = target.shares[strategy.members.index(c)]
        shares.append(masking.open_share(keys, agree[TARGET], sealed, RUN, 1, TARGET, c))
    seed = masking.combine_seed(shares)
    estimate -= masking.prg(seed, SIZE, bits)
    # pair masks: the colluders derive theirs; honest peers' seeds only from their answers
    for peer in NODES:
        if peer == TARGET:
            continue
        if peer in colluders:
            pair = masking.pair_seed(run_keys(fleet.contexts[peer]), agree[TARGET], RUN, 1, peer, TARGET)
        elif TARGET in answers.get(peer, ({}, {}))[1]:
            pair = answers[peer][1][TARGET]
        elif peer in answers.get(TARGET, ({}, {}))[1]:  # the target itself was told this peer dropped
            pair = answers[TARGET][1][peer]
        else:
            continue  # unknown: this peer's mask stays in
        estimate -= masking.pair_correction(TARGET, peer, pair, SIZE, bits)
    recovered = hashlib.sha256(seed).digest() == target.commit
    values = masking.signed(estimate & ((1 << bits) - 1), bits)
    return values, recovered


def _accuracy(values, signs) -> float:
    return float(np.mean(np.sign(values) == signs))


@pytest.mark.parametrize("colluders, hidden", [(T - 1, True), (T, False)])
def test_server_declaring_the_target_dropped_needs_t_colluders(round1, colluders, hidden):
    """A malicious server that got the target's words says it dropped: every honest survivor gives its
    pair seed with the target; the self mask still needs t shares, which only the colluders give."""
    fleet, strategy, parts, signs = round1
    coalition = NODES[:colluders]
    honest = [n for n in NODES if n not in coalition and n != TARGET]
    survivors = [n for n in NODES if n != TARGET]
    answers = _answers(fleet, strategy, parts, survivors, [TARGET], honest)
    values, recovered = _attack(fleet, strategy, parts[TARGET], coalition, answers)
    if hidden:
        assert not recovered and abs(_accuracy(values, signs) - 0.5) < 0.05
    else:  # the test has the power to see a break: t colluders read every sign
        assert recovered and _accuracy(values, signs) == 1.0


def test_an_honest_round_reveals_nothing_of_one_update_to_t_minus_1_colluders(round1):
    """The protocol as written: the target survived, so its self mask is rebuilt (the server needs it),
    but every honest peer's pair mask stays on its words."""
    fleet, strategy, parts, signs = round1
    coalition = NODES[:T - 1]
    honest = [n for n in NODES if n not in coalition]
    answers = _answers(fleet, strategy, parts, NODES, [], honest)
    values, recovered = _attack(fleet, strategy, parts[TARGET], coalition, answers)
    assert recovered  # the self mask is removed, as the sum needs
    assert abs(_accuracy(values, signs) - 0.5) < 0.05


def test_a_split_view_gets_shares_or_seeds_from_each_honest_peer_never_both(round1):
    """Half the honest peers are told the target survived (their shares of its self mask), the other
    half that it dropped (their pair seeds); then each half is asked the other way round."""
    fleet, strategy, parts, signs = round1
    coalition = NODES[:T - 1]
    honest = [n for n in NODES if n not in coalition and n != TARGET]
    told_survived, told_dropped = honest[:3], honest[3:]
    answers = _answers(fleet, strategy, parts, NODES, [], told_survived)
    answers.update(_answers(fleet, strategy, parts, [n for n in NODES if n != TARGET], [TARGET], told_dropped))
    values, recovered = _attack(fleet, strategy, parts[TARGET], coalition, answers)
    assert recovered  # 3 honest shares + 4 colluders >= t: the self mask is known ...
    assert abs(_accuracy(values, signs) - 0.5) < 0.05  # ... but 3 honest pair masks remain
    for group, survivors, dropped in ((told_survived, [n for n in NODES if n != TARGET], [TARGET]),
                                      (told_dropped, NODES, [])):
        requests = strategy._unmask_requests([parts[n] for n in survivors], 1, dropped)
        for msg in (m for m in requests if m.metadata.dst_node_id in group):
            with pytest.raises(MaskError, match="already answered the round-1 unmask request"):
                mask_unmask(msg, fleet.contexts[msg.metadata.dst_node_id])


def test_isolating_the_target_with_the_colluders_leaves_a_pair_mask_on(round1):
    """The server names only the target and the colluders as survivors, every honest peer dropped: the
    target refuses (a self mask needs t shares from the *other* survivors, so it unmasks only sums of
    t + 1). With one honest peer added to reach t + 1, the target answers with its pair seeds towards
    the "dropped", the honest survivor gives its share of the target's self mask — and keeps its own
    pair seed with the target, so that mask stays on."""
    fleet, strategy, parts, signs = round1
    coalition = NODES[:T - 1]
    survivors = [*coalition, TARGET]
    requests = strategy._unmask_requests([parts[n] for n in survivors], 1, [n for n in NODES if n not in survivors])
    target_request = next(m for m in requests if m.metadata.dst_node_id == TARGET)
    with pytest.raises(MaskError, match="unmasks only sums of at least 6"):
        mask_unmask(target_request, fleet.contexts[TARGET])
    honest = [n for n in NODES if n not in survivors]
    survivors = [*coalition, honest[0], TARGET]
    dropped = honest[1:]
    answers = _answers(fleet, strategy, parts, survivors, dropped, [honest[0]])
    requests = strategy._unmask_requests([parts[n] for n in survivors], 1, dropped)
    rec = mask_unmask(next(m for m in requests if m.metadata.dst_node_id == TARGET),
                      fleet.contexts[TARGET]).content[wire.UNMASK]
    assert str(TARGET) not in rec.get(wire.FROM, [])  # never a share of its own self mask
    answers[TARGET] = ({}, dict(zip(wire.as_ints(rec[wire.DROPPED]), rec[wire.SEEDS])))
    forged = Message(content=requests[0].content, dst_node_id=dropped[0], message_type=wire.QUERY_MASK_UNMASK)
    with pytest.raises(MaskError, match="listed as dropped"):
        mask_unmask(forged, fleet.contexts[dropped[0]])
    values, recovered = _attack(fleet, strategy, parts[TARGET], coalition, answers)
    assert recovered  # t-1 colluders' shares and the honest survivor's: the self mask is known ...
    assert abs(_accuracy(values, signs) - 0.5) < 0.05  # ... the target's pair mask with that survivor is not


# -- key substitution: the server hands a gateway keys of its own making ----------------------------------
@pytest.fixture(scope="module")
def fleet_certs(tmp_path_factory):
    from iiotfl.security import certs

    d = tmp_path_factory.mktemp("certs")
    certs.create(d, gateways=len(NODES))
    other = tmp_path_factory.mktemp("rogue-ca")
    certs.create(other, gateways=1)  # a CA the server made for itself
    return d, other


def _substituted(msg, victim_pos: int, agree: bytes, sign: bytes, cert: bytes = b"", proof: bytes = b""):
    config = ConfigRecord(dict(wire.config_record(msg.content, "config")))
    for key, value in ((wire.MASK_AGREE, agree), (wire.MASK_SIGN, sign), (wire.MASK_CERTS, cert),
                       (wire.MASK_PROOFS, proof)):
        values = list(config.get(key, [b""] * len(NODES)))
        values[victim_pos] = value
        config[key] = values
    return Message(RecordDict({**msg.content, "config": config}), dst_node_id=msg.metadata.dst_node_id,
                   message_type="train")


def test_keys_not_vouched_for_by_the_fleets_ca_are_refused(tmp_path, serverapp_identity, fleet_certs):
    """With identities (each gateway's certificate from the fleet's CA signs its run keys), a server that
    puts its own keys in place of gateway 1's — with no certificate, its own CA's, gateway 3's real one,
    or gateway 1's real certificate and proof with other keys — is refused by gateway 10, which then masks
    nothing. An honest round goes through, and the certificates travel once a run."""
    from iiotfl.security import certs

    d, rogue = fleet_certs
    fleet = MaskFleet(NODES, tmp_path, certs=d)
    strategy = fleet.strategy()
    msgs = fleet.configure(strategy, 1)
    target = msgs[TARGET]
    config = wire.config_record(target.content, "config")
    mine = masking.RunKeys.generate()
    real_cert, real_proof = list(config[wire.MASK_CERTS])[0], list(config[wire.MASK_PROOFS])[0]
    third_cert, third_proof = list(config[wire.MASK_CERTS])[2], list(config[wire.MASK_PROOFS])[2]
    rogue_identity = masking.Identity.load(certs.gateway_crt(rogue, 0), certs.gateway_tls_key(rogue, 0),
                                           rogue / certs.CA_CRT)
    own_cert, own_proof = rogue_identity.vouch(RUN, 1, mine.agree_public, mine.sign_public)
    attempts = {
        "no certificate of the fleet's CA": (b"", b""),
        "the fleet's CA did not issue": (own_cert, own_proof),
        "not signed by the certificate sent with them": (third_cert, third_proof),
    }
    for says, (cert, proof) in attempts.items():
        with pytest.raises(MaskError, match=says):
            fleet.reply(_substituted(target, 0, mine.agree_public, mine.sign_public, cert, proof), np.zeros(SIZE))
    with pytest.raises(MaskError, match="not signed by the certificate sent with them"):
        fleet.reply(_substituted(target, 0, mine.agree_public, mine.sign_public, real_cert, real_proof),
                    np.zeros(SIZE))
    # the honest round: every gateway checks every voucher once, the sum is unmasked
    replies = [fleet.reply(m, np.zeros(SIZE)) for m in msgs.values()]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.current == set(NODES)
    msgs2 = fleet.configure(strategy, 2)
    assert all(wire.MASK_CERTS not in wire.config_record(m.content, "config") for m in msgs2.values())
    # round 2: a substitution of an already checked peer, without a voucher, is refused too
    with pytest.raises(MaskError, match="no certificate of the fleet's CA"):
        fleet.reply(_substituted(msgs2[TARGET], 0, mine.agree_public, mine.sign_public), np.zeros(SIZE))
    arrays, _ = strategy.aggregate_train(2, [fleet.reply(m, np.zeros(SIZE)) for m in msgs2.values()])
    assert arrays is not None
