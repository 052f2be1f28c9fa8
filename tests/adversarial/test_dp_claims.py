"""Privacy claims that must hold when rounds go wrong: an extra or late reply under sample-level DP,
a skipped round under client-level DP, a reported ε that was tampered with.

Real code paths throughout: the gateways train with clients/app.py's DP-SGD (Opacus, its accountant
kept in a Flower Context), replies pass through the ServerApp's DeadlineGrid behind a scripted grid,
the round log and the privacy ledger are written as the ServerApp writes them, and
``accounting_check`` recomputes every ε with dp-accounting.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from torch import nn

from iiotfl.clients.app import _train_dp
from iiotfl.configs import compose
from iiotfl.privacy.accounting import DeviceAccountant, accounting_check, agrees, recompute_rdp
from iiotfl.privacy.ledger import LATE, STATUS, Ledger, form_of, load
from iiotfl.server.roundlog import RoundLog
from iiotfl.server.rounds import DeadlineGrid
from iiotfl.strategies import distributed_dp, wire
from iiotfl.strategies.client_dp import build_client_dp

RECORDS, BATCH = 400, 16  # sample rate 1/25: dp-accounting converges at every order


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(x).squeeze(-1)


class Gateway:
    """One plant gateway: clients/app.py's ``_train_dp`` on a tiny model, its DP state in a Flower Context."""

    def __init__(self, cfg: dict, partition: int) -> None:
        self.cfg, self.partition = cfg, partition
        self.context = Context(run_id=1, node_id=partition + 1, node_config={"partition-id": partition},
                               state=RecordDict(), run_config={})
        rng = np.random.default_rng(partition)
        self.x = rng.standard_normal((RECORDS, 4)).astype(np.float32)
        self.y = rng.standard_normal(RECORDS).astype(np.float32)

    def train(self, server_round: int) -> dict:
        """The train reply's metrics, as clients/app.py's ``train`` sends them under privacy=sample."""
        started = time.time()
        config = ConfigRecord({wire.BATCH_SIZE: BATCH, wire.LOCAL_EPOCHS: 1, wire.SERVER_ROUND: server_round})
        common = dict(epochs=1, batch_size=BATCH, lr=1e-2, seed=server_round, loss_fn=nn.MSELoss())
        torch.manual_seed(0)
        stats, dp = _train_dp(SimpleNamespace(cfg=self.cfg), self.context, Tiny(), self.x, self.y,
                              SimpleNamespace(target=lambda y: y), config, self.partition, common)
        assert stats is not None, "no budget set: the gateway always trains"
        return {**stats, **dp, "partition": self.partition, wire.NUM_EXAMPLES: RECORDS, wire.BYTES_DOWN: 1000,
                wire.BYTES_UP: 120 + self.partition, wire.T_START: started, wire.T_END: time.time()}


class ScriptedFleet:
    """The grid under the ServerApp's DeadlineGrid. Every gateway sent a train message trains at once
    (a device trains whether or not its reply makes the deadline); the replies come back in ``order``,
    except those of ``silent`` gateways, which never arrive. ``content(node, metrics)`` builds a reply."""

    def __init__(self, train, content=lambda node, metrics: RecordDict({"metrics": MetricRecord(metrics)})):
        self.train, self.content = train, content
        self.order: list[int] = []
        self.silent: set[int] = set()
        self.nodes: list[int] = []
        self.pushed: dict[str, int] = {}
        self.replies: dict[int, dict] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            self.pushed[mid] = node = m.metadata.dst_node_id
            self.replies[node] = self.train(node, m)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        by_node = {node: mid for mid, node in self.pushed.items() if mid in ids}
        out = []
        for node in self.order:
            if node in by_node and node not in self.silent:
                mid = by_node[node]
                md = Metadata(run_id=1, message_id=f"r{mid}", src_node_id=node, dst_node_id=0,
                              reply_to_message_id=mid, group_id="", created_at=time.time(), ttl=60,
                              message_type=MessageType.TRAIN)
                out.append(Message(self.content(node, self.replies[node]), metadata=md))
        return out


def _train_messages(nodes, server_round: int):
    return [Message(RecordDict({"config": ConfigRecord({wire.SERVER_ROUND: server_round})}),
                    metadata=Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=n, reply_to_message_id="",
                                      group_id="", created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN))
            for n in nodes]


class Server:
    """The ServerApp's bookkeeping of a run: DeadlineGrid, round log, privacy ledger, the final check."""

    def __init__(self, tmp_path, cfg: dict, fleet: ScriptedFleet, nodes: dict[int, int], min_replies: int = 1):
        self.cfg, self.fleet = cfg, fleet
        self.grid = DeadlineGrid(fleet, deadline_s=0.3, min_replies=min_replies, poll_s=0.01)
        self.log = RoundLog(tmp_path / "metrics.jsonl", cfg, self.grid, simulated=False)
        self.log.node_partition = dict(nodes)
        self.ledger = Ledger(tmp_path / "privacy_ledger.jsonl", cfg)
        self.ledger.record_statistics(nodes, {n: 10 for n in nodes})

    def record(self, server_round: int, spent=None) -> None:
        """What the ServerApp's evaluate_fn does after a round (server/app.py ``_evaluator``)."""
        privacy_row = {"epsilon": spent.epsilon, "delta": spent.delta} if spent is not None else {}
        if spent is not None and getattr(spent, "noise_multiplier", None) is not None:
            privacy_row["noise_multiplier"] = spent.noise_multiplier
        self.log.write(server_round, {}, privacy_row)
        if server_round:
            self.ledger.record(self.log.rows[-1], privacy_row.get("epsilon"), privacy_row.get("delta"))

    def check(self) -> dict:
        return accounting_check(self.cfg, load(self.ledger.path), self.log.rows)

    def row(self, server_round: int, gateway: int) -> dict:
        return next(r for r in load(self.ledger.path) if r["round"] == server_round and r["gateway"] == gateway)


def _sample_run(tmp_path, script: list[dict]):
    """A sample-DP run of two gateways (nodes 1, 2 = plants 0, 1); each round of ``script`` says how
    many replies it keeps (``need``) and which gateways' replies never arrive (``silent``)."""
    cfg = compose(["privacy=sample", "privacy.epsilon=null", "privacy.noise_multiplier=1.1", "privacy.delta=1e-5",
                   "fleet.gateways=2", f"fleet.rounds={len(script)}"])
    gateways = {1: Gateway(cfg, 0), 2: Gateway(cfg, 1)}
    fleet = ScriptedFleet(lambda node, msg: gateways[node].train(
        wire.as_int(msg.content["config"][wire.SERVER_ROUND])))
    server = Server(tmp_path, cfg, fleet, {1: 0, 2: 1})
    server.record(0)
    for server_round, step in enumerate(script, 1):
        fleet.order, fleet.silent = [1, 2], set(step.get("silent", ()))
        server.grid.on_sampled(server_round, [1, 2], need=step.get("need", 2))
        server.grid.send_and_receive(_train_messages([1, 2], server_round), timeout=600)
        server.record(server_round)
    return server, gateways


def _opacus(gateway: Gateway) -> float:
    """The gateway's own ε (Opacus), from the DP state it kept in its Context."""
    rec = gateway.context.state["dp"]
    return DeviceAccountant(1e-5, list(zip(rec["sigma"], rec["q"], rec["steps"]))).epsilon()


def test_an_extra_reply_is_recorded_as_sent_at_its_real_cost(tmp_path):
    # round 2 keeps the first reply only: plant 1 trained with DP-SGD and replied, beyond the first K
    server, gateways = _sample_run(tmp_path, [{}, {"need": 1}, {}])
    row = server.row(2, 1)
    assert row["status"] == STATUS["extra"] == "sent, not aggregated (extra)"
    assert row["bytes_sent"] == 121 and row["form"] == form_of(server.cfg) != "nothing"
    assert row["steps"] > 0 and row["epsilon"] > server.row(1, 1)["epsilon"]
    assert server.log.rows[2]["extra"] == [1] and server.log.rows[2]["aggregated"] == 1
    # every reply's history has fleet.rounds entries: Flower averages list metrics element-wise
    assert {len(m[wire.DP_HISTORY_STEPS]) for m in server.grid.train_trace.metrics.values()} == {3}
    checks = {c["scope"]: c for c in server.check()["checks"]}
    assert all(c["ok"] for c in checks.values()), checks
    final = checks["gateway 1"]
    assert final["reported"] == pytest.approx(_opacus(gateways[2])) and final["rounds_checked"] == 3
    # what the ledger used to claim (the extra round sent nothing, 0 steps) does not add up to that ε
    aggregated = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in load(server.ledger.path)
                  if r["gateway"] == 1 and r["status"] == "sent" and r["round"]]
    assert not agrees(final["reported"], recompute_rdp(aggregated, 1e-5))


def test_a_late_reply_is_unknown_until_the_device_reports_again(tmp_path):
    # plant 1's replies of rounds 2 and 4 never arrive, but it trained in both
    server, gateways = _sample_run(tmp_path, [{}, {"silent": [2]}, {}, {"silent": [2]}])
    for late in (2, 4):
        row = server.row(late, 1)
        assert row["status"] == LATE == "late: unknown until the device reports again"
        assert row["bytes_sent"] is None and row["steps"] is None and row["epsilon"] is None
        assert row["form"] == "unknown"
    # its round-3 reply covers round 2: the history it reports has three rounds of steps
    row3 = server.row(3, 1)
    assert [s for _, _, s in row3["dp_history"]] == [3 * row3["steps"]]
    checks = {c["scope"]: c for c in server.check()["checks"]}
    assert all(c["ok"] for c in checks.values()), checks
    final = checks["gateway 1"]
    assert final["reported"] == pytest.approx(row3["epsilon"]) and final["unreported_rounds"] == [4]
    four_rounds = _opacus(gateways[2])  # what it really spent: round 4's steps are still unreported
    assert four_rounds > final["reported"] and checks["gateway 0"]["unreported_rounds"] == []
    # leaving out the late round's steps would not match what the device reported
    assert not agrees(row3["epsilon"], recompute_rdp([(1.1, row3["sample_rate"], 2 * row3["steps"])], 1e-5))


def _client_reply(node: int, metrics: dict) -> RecordDict:
    arrays = ArrayRecord({"w": Array(np.full(3, 0.1 * node, dtype=np.float32))})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({**metrics, wire.DP_WEIGHT: 1})})


class Distributed:
    """What strategy=he / secagg do with their distributed-DP accountant (strategies/he_fedavg.py ``HEDP``):
    record the noise of the replies that made the aggregate, none when nothing was aggregated."""

    def __init__(self, cfg: dict) -> None:
        self.dp = distributed_dp(cfg)

    def configure_train(self, server_round, arrays, config, grid):  # noqa: ARG002
        return _train_messages(list(grid.get_node_ids()), server_round)

    def aggregate_train(self, server_round, replies):  # noqa: ARG002
        replies = list(replies)
        if replies:
            self.dp.record(len(replies))
        return None, None

    def privacy_spent(self):
        return self.dp.spent()


@pytest.mark.parametrize("kind", ["flower-wrapper", "distributed"])
def test_a_skipped_round_under_client_dp_spends_nothing(tmp_path, serverapp_identity, kind):
    cfg = compose(["privacy=client", "privacy.noise_multiplier=1.0", "fleet.gateways=4", "fleet.rounds=3",
                   "fleet.min_replies=2"])
    now = time.time()

    def train(node, msg):
        return {"partition": node - 1, wire.NUM_EXAMPLES: 10, wire.BYTES_DOWN: 100, wire.BYTES_UP: 80,
                wire.T_START: now, wire.T_END: now}

    fleet = ScriptedFleet(train, _client_reply)
    fleet.nodes = [1, 2, 3, 4]
    server = Server(tmp_path, cfg, fleet, {n: n - 1 for n in fleet.nodes}, min_replies=2)
    # Flower's server-side clipping wrapper and RDP accountant, or HEDP's (Flower's RDP accountant too)
    strategy = build_client_dp(cfg) if kind == "flower-wrapper" else Distributed(cfg)
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    server.record(0, strategy.privacy_spent())
    for server_round, silent in enumerate([set(), {2, 3, 4}, set()], 1):  # round 2: one reply of the two needed
        fleet.order, fleet.silent = fleet.nodes, silent
        messages = strategy.configure_train(server_round, arrays, ConfigRecord({}), server.grid)
        replies = server.grid.send_and_receive(messages, timeout=600)
        new, _ = strategy.aggregate_train(server_round, replies)
        arrays = new if new is not None else arrays
        server.record(server_round, strategy.privacy_spent())
    skipped = server.log.rows[2]
    assert skipped["skipped"] and skipped["aggregated"] == 0
    assert skipped["privacy"]["epsilon"] == server.log.rows[1]["privacy"]["epsilon"]  # the accountant composed nothing
    row = server.row(2, 0)
    assert row["status"] == STATUS["skipped"] and row["released"] is False and row["noise_multiplier"] is None
    assert server.row(2, 1)["status"] == LATE and server.row(3, 0)["released"] is True
    (fleet_check,) = server.check()["checks"]
    assert fleet_check["ok"] and fleet_check["releases"] == 2, fleet_check
    reported, noise = fleet_check["reported"], server.row(3, 0)["noise_multiplier"]
    assert reported == pytest.approx(strategy.privacy_spent().epsilon)
    assert not agrees(reported, recompute_rdp([(noise, 1.0, 3)], fleet_check["delta"]))  # counting the skipped round


def _tamper(path, server_round: int, gateway: int, factor: float) -> None:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        if r["round"] == server_round and r["gateway"] == gateway:
            r["epsilon"] *= factor
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_tampered_epsilon_fails_the_check(tmp_path):
    server, _ = _sample_run(tmp_path, [{}, {}, {}])
    assert all(c["ok"] for c in server.check()["checks"])
    _tamper(server.ledger.path, 2, 0, 0.95)  # 5% less than plant 0 spent by round 2; its last report is honest
    checks = {c["scope"]: c for c in server.check()["checks"]}
    assert not checks["gateway 0"]["ok"] and checks["gateway 0"]["mismatched_rounds"] == [2]
    assert checks["gateway 1"]["ok"]
    _tamper(server.ledger.path, 3, 1, 1.03)  # the last report, 3% over
    checks = {c["scope"]: c for c in server.check()["checks"]}
    assert not checks["gateway 1"]["ok"] and checks["gateway 1"]["mismatched_rounds"] == [3]
