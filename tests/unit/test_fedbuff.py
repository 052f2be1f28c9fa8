"""strategy=fedbuff: the staleness weight, the buffer's aggregation against a hand-computed case, duplicates
and stale replies dropped, the per-version model store, the delta catch-up with a lossy downlink (the
ClientApp's own ``_start_view`` on the other side), and the discrete-event order on the simulated clock."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from iiotfl.clients.app import _start_view
from iiotfl.configs import ConfigError, compose
from iiotfl.server.report.run_report import versions_section
from iiotfl.strategies import validate_strategy, wire
from iiotfl.strategies.codec_fedavg import encoded_record
from iiotfl.strategies.codecs import Int8Codec, NoneCodec, flatten
from iiotfl.strategies.fedbuff import (
    FedBuff,
    Job,
    Loop,
    ModelStore,
    SimClock,
    _fleet_loop,
    _sim_loop,
    aggregate,
    staleness_weight,
)


def _reply(job: Job, update: np.ndarray, examples: int, codec=None, msg_id: str = "", **metrics) -> Message:
    enc = (codec or NoneCodec()).encode(update.astype(np.float32), np.random.default_rng(0))
    md = Metadata(run_id=1, message_id=f"r{msg_id}", src_node_id=job.node, dst_node_id=0,
                  reply_to_message_id=msg_id, group_id="", created_at=time.time(), ttl=60,
                  message_type=MessageType.TRAIN)
    content = RecordDict({wire.UPDATE: encoded_record(enc),
                          "metrics": MetricRecord({wire.NUM_EXAMPLES: examples, **metrics})})
    return Message(content, metadata=md)


def _fedbuff(model: np.ndarray, **kwargs) -> FedBuff:
    fb = FedBuff(codec=kwargs.pop("codec", NoneCodec()), **kwargs)
    fb.begin({"w": model.astype(np.float32)})
    return fb


def test_staleness_weight_is_fedbuffs_polynomial():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    assert staleness_weight(1, exponent=1.0) == pytest.approx(0.5)
    assert staleness_weight(5, exponent=0.0) == 1.0
    with pytest.raises(ValueError):
        staleness_weight(-1)


def test_three_updates_with_staleness_and_examples_give_the_hand_computed_model():
    # staleness 0, 3, 8 -> w = 1, 1/2, 1/3; examples 10, 20, 30 -> every w*n is 10, the examples sum to 60
    # step = 10 * ([1, 0] + [0, 1] + [2, 2]) / 60 = [0.5, 0.5]; server_lr 0.5 -> [1, 2] + [0.25, 0.25]
    fb = _fedbuff(np.array([1.0, 2.0]), buffer_size=3, server_lr=0.5, max_staleness=10)
    fb.version = 8
    cases = [(1, 8, [1.0, 0.0], 10), (2, 5, [0.0, 1.0], 20), (3, 0, [2.0, 2.0], 30)]
    for node, base, u, n in cases:
        job = Job(node=node, seq=1, base=base, sent=0.0)
        job.reply = _reply(job, np.array(u), n)
        assert fb.accept(job)
    row = fb.flush(12.5)
    np.testing.assert_array_equal(fb.global_, np.array([1.25, 2.25], dtype=np.float32))
    assert fb.version == 9 and row["version"] == 9 and row["time_s"] == 12.5
    assert [a["staleness"] for a in row["applied"]] == [0, 3, 8]
    assert [a["weight"] for a in row["applied"]] == pytest.approx([1 / 6] * 3)  # w*n / Σ n
    assert row["staleness_max"] == 8 and row["staleness_mean"] == pytest.approx(11 / 3)
    assert aggregate(np.array([1.0], dtype=np.float32), [(np.array([2.0]), 1.0, 1.0), (np.array([4.0]), 3.0, 0.5)],
                     1.0)[0] == pytest.approx(1.0 + (2.0 + 6.0) / 4.0)


def test_a_duplicated_or_replayed_reply_is_applied_once():
    fb = _fedbuff(np.zeros(2), buffer_size=2)
    job = Job(node=7, seq=1, base=0, sent=0.0)
    job.reply = _reply(job, np.ones(2), 5)
    assert fb.accept(job)
    assert not fb.accept(job)  # the same (node, seq) again
    assert len(fb.buffer) == 1 and fb.dropped[-1]["reason"].startswith("duplicate")
    assert fb.dropped[-1]["node"] == 7 and fb.dropped[-1]["seq"] == 1


def test_a_reply_nobody_waits_for_is_dropped_by_the_loop():
    class Replays:
        def pull_messages(self, ids):  # noqa: ARG002
            job = Job(node=3, seq=9, base=0, sent=0.0)
            return [_reply(job, np.ones(2), 1, msg_id="gone")]

    fb = _fedbuff(np.zeros(2))
    fb.jobs["live"] = Job(node=4, seq=1, base=0, sent=time.time(), msg_id="live")
    loop = Loop(Replays(), fb, compose(["strategy=fedbuff"]), {}, lambda *a: None, 1)  # type: ignore[arg-type]
    assert loop.pull() == [] and list(fb.jobs) == ["live"]


def test_a_reply_staler_than_max_staleness_is_dropped_and_named():
    fb = _fedbuff(np.zeros(2), max_staleness=2)
    fb.version = 5
    ok, stale = Job(node=1, seq=1, base=3, sent=0.0), Job(node=2, seq=1, base=2, sent=0.0)
    ok.reply, stale.reply = _reply(ok, np.ones(2), 1), _reply(stale, np.ones(2), 1)
    assert fb.accept(ok) and not fb.accept(stale)
    assert fb.dropped == [{"node": 2, "seq": 1, "base": 2, "metrics": {wire.NUM_EXAMPLES: 1},
                           "reason": "stale: 3 versions old > strategy.max_staleness=2"}]
    assert fb.flush(0.0)["dropped"][0]["node"] == 2 and fb.dropped == []


def test_the_model_store_keeps_only_versions_someone_holds():
    store = ModelStore(np.zeros(2))
    store.hold(1, 0, np.zeros(2))
    store.add(1, np.ones(2))
    store.add(2, np.full(2, 2.0))
    assert sorted(store.models) == [0, 2]  # 1: nobody holds it, and it is not current
    store.hold(1, 2, np.full(2, 2.0))
    assert sorted(store.models) == [2]
    store.hold(2, 2, np.full(2, 2.5))  # a lossy view: kept per gateway
    assert store.view(2)[1][0] == 2.5 and store.view(1)[1][0] == 2.0  # type: ignore[index]
    store.forget(2)
    assert store.view(2) is None


@pytest.mark.usefixtures("serverapp_identity")
def test_delta_catch_up_with_a_lossy_downlink_rebuilds_the_same_view_on_both_sides():
    rng = np.random.default_rng(1)
    model = rng.normal(size=300).astype(np.float32)
    fb = _fedbuff(model, codec=Int8Codec(), downlink="delta", buffer_size=1, server_lr=0.7)
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})

    def deliver(msg: Message) -> np.ndarray:
        return flatten(_start_view(msg, ctx, Int8Codec(), None))

    msg, job = fb.message(5, {}, 0.0)
    assert "arrays" in msg.content  # first message: the full model
    np.testing.assert_array_equal(deliver(msg), model)
    for step in range(3):  # other gateways move the model on; this one catches up with a lossy delta
        for _ in range(step + 1):
            other = Job(node=9, seq=len(fb.applied) + 1, base=fb.version, sent=0.0)
            other.reply = _reply(other, rng.normal(size=300), 1, codec=Int8Codec())
            assert fb.accept(other)
            fb.flush(0.0)
        msg, job = fb.message(5, {}, 0.0)
        assert "delta" in msg.content and "arrays" not in msg.content
        assert wire.config_record(msg.content, "config")[wire.BASE_ROUND] == job.base + 1 - (step + 1)
        client = deliver(msg)
        server = fb.store.view(5)[1]  # type: ignore[index]
        np.testing.assert_array_equal(client, server)  # bit for bit
        assert not np.array_equal(client, fb.global_)  # the downlink is lossy: the view is not the global model
        assert np.abs(client - fb.global_).max() < 0.05


class SimGrid:
    """Every pushed message is answered at once, the replies in the reverse of the order pushed; each
    gateway's reply reports a fixed compute time (its simulated duration) and an update of its own."""

    def __init__(self, compute: dict[int, float]) -> None:
        self.compute = compute
        self.pushed: dict[str, Message] = {}
        self.waiting: list[str] = []

    def get_node_ids(self):
        return list(self.compute)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            self.pushed[mid] = m
            self.waiting.append(mid)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in reversed([m for m in self.waiting if m in set(ids)]):
            node = self.pushed[mid].metadata.dst_node_id
            job = Job(node=node, seq=0, base=0, sent=0.0)
            out.append(_reply(job, np.full(2, float(node)), 1, msg_id=mid, partition=node - 1,
                              **{wire.T_START: 0.0, wire.T_END: self.compute[node], wire.BYTES_DOWN: 0,
                                 wire.BYTES_UP: 0}))
            self.waiting.remove(mid)
        return out


@pytest.mark.usefixtures("serverapp_identity")
def test_the_simulated_clock_not_the_real_order_decides_which_update_comes_first():
    cfg = compose(["engine=sim", "strategy=fedbuff", "fleet.gateways=3", "strategy.buffer_size=1",
                   "strategy.max_staleness=100", "link=lte_m"])
    fb = _fedbuff(np.zeros(2), buffer_size=1, max_staleness=100)
    rows: list[dict] = []
    grid = SimGrid({1: 25.0, 2: 1.0, 3: 7.0})
    loop = Loop(grid, fb, cfg, {}, lambda v, a: rows.append(dict(fb.version_row or {})), 16)  # type: ignore[arg-type]
    _sim_loop(loop, SimClock(cfg), poll_s=0.0)
    order = [r["applied"][0]["node"] for r in rows]
    assert order[0] == 2  # the fastest on the simulated clock, though its reply was pulled last
    times = [r["time_s"] for r in rows]
    assert times == sorted(times) and len(rows) == 16
    slow = [r["applied"][0] for r in rows if r["applied"][0]["node"] == 1]
    assert slow and slow[0]["staleness"] > 0  # gateway 1 (25 s) came back to a model many versions on
    keys = [(r["applied"][0]["node"], r["applied"][0]["seq"]) for r in rows]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("override, key", [
    ("strategy.buffer_size=0", "strategy.buffer_size"),
    ("strategy.buffer_size=9", "strategy.buffer_size"),
    ("strategy.server_lr=0", "strategy.server_lr"),
    ("strategy.max_staleness=-1", "strategy.max_staleness"),
    ("strategy.staleness_exponent=-1", "strategy.staleness_exponent"),
    ("privacy=client", "privacy=client"),
    ("fleet.clients_per_round=2", "fleet.clients_per_round"),
    ("fleet.over_selection=0.5", "fleet.over_selection"),
])
def test_config_checks_name_the_key(override, key):
    cfg = compose(["strategy=fedbuff", "fleet.gateways=4", override])
    with pytest.raises(ConfigError, match=key) as err:
        validate_strategy(cfg)
    assert "\n" not in str(err.value)


def test_the_default_config_is_valid():
    validate_strategy(compose(["strategy=fedbuff"]))
    assert ConfigRecord({wire.SERVER_ROUND: 1})  # the wire's round is version + 1


class FleetGrid:
    """Real time, scaled down: gateway n answers ``delay[n]`` s after its message was pushed; gateway 3 is
    offline from ``down[0]`` to ``down[1]`` s (not connected; its outstanding message answered as undelivered)."""

    def __init__(self, delay: dict[int, float], down: tuple[float, float]) -> None:
        self.delay, self.down, self.t0 = delay, down, time.time()
        self.pushed: dict[str, tuple[Message, float]] = {}
        self.waiting: list[str] = []

    def offline(self, node: int) -> bool:
        return node == 3 and self.down[0] <= time.time() - self.t0 < self.down[1]

    def get_node_ids(self):
        return [n for n in self.delay if not self.offline(n)]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            self.pushed[mid], ids = (m, time.time()), [*ids, mid]
            self.waiting.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in [m for m in self.waiting if m in set(ids)]:
            msg, at = self.pushed[mid]
            node = msg.metadata.dst_node_id
            job = Job(node=node, seq=0, base=0, sent=0.0)
            if self.offline(node):
                md = Metadata(run_id=1, message_id=f"r{mid}", src_node_id=0, dst_node_id=0, reply_to_message_id=mid,
                              group_id="", created_at=time.time(), ttl=60, message_type=MessageType.TRAIN)
                out.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="offline"), metadata=md))
            elif time.time() >= at + self.delay[node]:
                out.append(_reply(job, np.full(2, float(node)), 1, msg_id=mid, partition=node - 1))
            else:
                continue
            self.waiting.remove(mid)
        return out


@pytest.mark.usefixtures("serverapp_identity")
def test_the_fleet_loop_gives_a_returning_gateway_the_full_model_and_applies_it_with_its_staleness():
    cfg = compose(["strategy=fedbuff", "fleet.gateways=3", "strategy.buffer_size=2"])
    fb = _fedbuff(np.zeros(2), buffer_size=2, max_staleness=100, downlink="delta")
    rows: list[dict] = []
    grid = FleetGrid({1: 0.02, 2: 0.03, 3: 0.12}, down=(0.05, 0.4))
    loop = Loop(grid, fb, cfg, {}, lambda v, a: rows.append(dict(fb.version_row or {})), 40)  # type: ignore[arg-type]
    _fleet_loop(loop, poll_s=0.005)
    keys = [(a["node"], a["seq"]) for r in rows for a in r["applied"]]
    assert len(rows) == 40 and len(keys) == len(set(keys))
    gw3 = [a for r in rows for a in r["applied"] if a["node"] == 3]
    assert gw3 and all(a["staleness"] > 0 for a in gw3)  # the slowest: versions were made while it trained
    assert gw3[0]["seq"] >= 2  # its first message was lost to the outage; a later one was applied
    sent = [m for m, _ in grid.pushed.values() if m.metadata.dst_node_id == 3]
    assert "arrays" in sent[1].content  # after the outage: the full model, not a delta ...
    assert "delta" in sent[2].content  # ... and deltas again once it is known what it holds


def test_the_report_shows_the_version_history_and_staleness_per_class():
    def gw(cls, s):
        return {"class": cls, "status": "aggregated", "staleness": s}

    rows = [{"round": 0, "server": {"rmse": 50.0}},
            {"round": 1, "version": 1, "time_s": 10.0, "clock": "simulated", "server": {"rmse": 20.0},
             "applied": [{}, {}], "staleness_mean": 0.0, "staleness_max": 0, "dropped": [],
             "gateways": [gw("lte_m/gateway", 0), gw("lte_m/gateway", 0)]},
            {"round": 2, "version": 2, "time_s": 18.5, "clock": "simulated", "server": {"rmse": 15.0},
             "applied": [{}, {}], "staleness_mean": 1.5, "staleness_max": 3,
             "dropped": [{"node": 9, "seq": 2, "base": 0, "reason": "duplicate: this update was already applied"}],
             "gateways": [gw("lte_m/gateway", 0), gw("satellite/gateway", 3)]}]
    text = "\n".join(versions_section(rows, "rmse"))
    assert "## Global model versions" in text and "simulated seconds" in text
    assert "| 2 | 18.5 | 2 | 1.5 | 3 | 1 | 15 |" in text
    assert "| lte_m/gateway | 3 | 0 | 0 |" in text and "| satellite/gateway | 1 | 3 | 3 |" in text
    assert "version 2: node 9 (seq 2): duplicate" in text
    assert versions_section(rows[:1], "rmse") == []  # synchronous rounds: no such section


def test_the_buffer_is_half_the_fleet_unless_set():
    from iiotfl.strategies.fedbuff import buffer_size

    assert buffer_size(compose(["strategy=fedbuff", "fleet.gateways=10"])) == 5
    assert buffer_size(compose(["strategy=fedbuff", "fleet.gateways=3"])) == 2
    assert buffer_size(compose(["strategy=fedbuff", "fleet.gateways=1"])) == 1
    assert buffer_size(compose(["strategy=fedbuff", "fleet.gateways=10", "strategy.buffer_size=3"])) == 3


@pytest.mark.parametrize("rebase, expected", [(True, [10.0, 2 ** -0.5 * 2]), (False, [10.0 + 2 ** -0.5 * 10, 2 ** -0.5 * 2])])
def test_a_stale_update_is_taken_against_todays_model_with_rebase(rebase, expected):
    """Two gateways trained from version 0; A's [10, 0] made version 1. B's [10, 2] (staleness 1, weight 1/sqrt 2):
    rebased it is B's model [10, 2] minus today's [10, 0] = [0, 2], so A's move is not applied a second time."""
    fb = _fedbuff(np.zeros(2), buffer_size=1, rebase=rebase)
    for node in (1, 2):  # both hold version 0 (as a dispatched message records)
        fb.store.hold(node, 0, np.zeros(2, np.float32))
    for node, u in ((1, [10.0, 0.0]), (2, [10.0, 2.0])):
        job = Job(node=node, seq=1, base=0, sent=0.0)
        job.reply = _reply(job, np.array(u), 5)
        assert fb.accept(job)
        fb.flush(float(node))
    np.testing.assert_allclose(fb.global_, expected, rtol=1e-6)
