"""The round-0 statistics query: a gateway briefly offline is asked again, a failed one is named."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from iiotfl.server import statistics
from iiotfl.server.rounds import DeadlineGrid
from iiotfl.strategies import wire

SUPERLINK = 0  # the SuperLink answers for an offline node under its own id


class StatsGrid:
    """Gateways 1..n answer with their sums; `offline` nodes are reported unavailable on the first ask
    and come back after `back_s`; `broken` nodes answer with their ClientApp's exception."""

    def __init__(self, nodes, offline=(), broken=(), back_s=0.3):
        self.nodes, self.offline, self.broken = list(nodes), set(offline), dict(broken)
        self.back_at = time.time() + back_s
        self.pushed: dict[str, int] = {}
        self.asked: list[int] = []

    def get_node_ids(self):
        now = time.time()
        return [n for n in self.nodes if n not in self.offline or now >= self.back_at]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            self.pushed[mid] = m.metadata.dst_node_id
            self.asked.append(m.metadata.dst_node_id)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in list(ids):
            node = self.pushed[mid]
            src = node
            if node in self.offline and self.asked.count(node) == 1:
                src, error = SUPERLINK, Error(ErrorCode.NODE_UNAVAILABLE, "node unavailable")
            elif node in self.broken:
                error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, self.broken[node])
            else:
                error = None
            md = Metadata(run_id=1, message_id=f"r{mid}", src_node_id=src, dst_node_id=SUPERLINK,
                          reply_to_message_id=mid, group_id="", created_at=time.time(), ttl=60,
                          message_type=wire.QUERY_FEATURE_STATS)
            if error is not None:
                out.append(Message(error, metadata=md))
                continue
            sums = np.full((1, 3), float(node))
            gateway = MetricRecord({"partition": node - 1, wire.NUM_EXAMPLES: 10 * node, wire.ROWS: 1, wire.COLS: 3})
            out.append(Message(RecordDict({wire.STATS: ArrayRecord(numpy_ndarrays=[sums]), wire.GATEWAY: gateway}),
                               metadata=md))
        return out


def test_a_gateway_offline_at_the_query_is_asked_again_once_it_is_back(serverapp_identity):
    grid = DeadlineGrid(StatsGrid([1, 2, 3], offline=[3]), deadline_s=30, poll_s=0.01)
    sums, partitions, _, examples = statistics.federated_feature_sums(grid, [1, 2, 3], timeout=30)
    assert partitions == {1: 0, 2: 1, 3: 2} and examples == {1: 10, 2: 20, 3: 30}
    assert sums.tolist() == [[6.0, 6.0, 6.0]]
    assert grid.grid.asked.count(3) == 2 and grid.grid.asked.count(1) == 1


def test_a_gateway_that_stays_offline_is_left_out_after_the_grace(monkeypatch, serverapp_identity):
    monkeypatch.setattr(statistics, "REASK_S", 0.5)
    grid = DeadlineGrid(StatsGrid([1, 2, 3], offline=[3], back_s=60), deadline_s=30, poll_s=0.01)
    start = time.time()
    sums, partitions, _, _ = statistics.federated_feature_sums(grid, [1, 2, 3], timeout=30)
    assert time.time() - start < 5 and partitions == {1: 0, 2: 1} and sums.tolist() == [[3.0, 3.0, 3.0]]


def test_a_gateways_data_error_reaches_the_user_with_the_gateway_and_the_reason(serverapp_identity):
    reason = "<class 'ValueError'>:<'plant 1: /data/plant_1.csv: no column \"vibration\"'>"
    grid = DeadlineGrid(StatsGrid([1], broken={1: reason}), deadline_s=30, poll_s=0.01)
    with pytest.raises(RuntimeError, match=r'gateway 1: ValueError: plant 1: .*no column "vibration"') as err:
        statistics.federated_feature_sums(grid, [1], timeout=30)
    assert grid.grid.asked == [1], "a gateway whose ClientApp failed is not asked again"
    assert "\n" not in str(err.value)


def test_a_gateway_that_joined_after_the_query_is_reported_under_its_own_plant(tmp_path):
    from types import SimpleNamespace

    from iiotfl.configs import compose
    from iiotfl.server.roundlog import RoundLog
    from iiotfl.server.rounds import RoundTrace

    now = time.time()
    reply = {wire.T_START: now - 2, wire.T_END: now - 1, wire.BYTES_DOWN: 100, wire.BYTES_UP: 50}
    trace = RoundTrace(sent={11: now - 3, 12: now - 3}, replied={11: now, 12: now},
                       metrics={11: {**reply, "partition": 0}, 12: {**reply, "partition": 2}}, started=now - 3, ended=now)
    log = RoundLog(tmp_path / "metrics.jsonl", compose(["fleet.gateways=3"]), SimpleNamespace(train_trace=trace), False)
    log.node_partition = {11: 0}  # gateway 12 was offline during the statistics query
    rows, summary = log._gateways()
    assert [(r["partition"], r["status"]) for r in rows] == [(0, "aggregated"), (2, "aggregated")]
    assert summary["aggregated"] == 2 and log.node_partition == {11: 0, 12: 2}
