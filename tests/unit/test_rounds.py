"""Round deadline, first-K replies and minimum replies, against a scripted grid."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from iiotfl.server.rounds import DeadlineGrid


class ScriptedGrid:
    """Gateways answer after a fixed delay each (None: never)."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        self.delays = delays
        self.pushed: dict[str, tuple[int, float]] = {}

    def get_node_ids(self):
        return list(self.delays)

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            mid = f"m{len(self.pushed)}"
            self.pushed[mid] = (m.metadata.dst_node_id, time.time())
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in list(ids):
            node, at = self.pushed[mid]
            delay = self.delays[node]
            if delay is not None and time.time() >= at + delay:
                md = Metadata(run_id=1, message_id=f"r{mid}", src_node_id=node, dst_node_id=0,
                              reply_to_message_id=mid, group_id="", created_at=time.time(), ttl=60,
                              message_type=MessageType.TRAIN)
                out.append(Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), metadata=md))
        return out


def _messages(nodes):
    return [Message(RecordDict({"config": ConfigRecord({})}),
                    metadata=Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=n, reply_to_message_id="",
                                      group_id="", created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN))
            for n in nodes]


def test_first_k_replies_are_kept_and_the_rest_are_not_waited_for():
    grid = DeadlineGrid(ScriptedGrid({1: 0.0, 2: 0.2, 3: 5.0, 4: None}), deadline_s=10, poll_s=0.05)
    grid.on_sampled(1, [1, 2, 3, 4], need=2)
    start = time.time()
    replies = list(grid.send_and_receive(_messages([1, 2, 3, 4]), timeout=600))
    assert time.time() - start < 2
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert grid.train_trace.late == [3, 4]


def test_deadline_ends_the_round_and_names_the_late():
    grid = DeadlineGrid(ScriptedGrid({1: 0.0, 2: None}), deadline_s=1.0, poll_s=0.05)
    start = time.time()
    replies = list(grid.send_and_receive(_messages([1, 2]), timeout=600))
    assert 1.0 <= time.time() - start < 2.0
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert grid.train_trace.late == [2] and not grid.train_trace.below_minimum


def test_too_few_replies_skip_the_round():
    grid = DeadlineGrid(ScriptedGrid({1: 0.0, 2: None, 3: None}), deadline_s=0.5, min_replies=2, poll_s=0.05)
    assert list(grid.send_and_receive(_messages([1, 2, 3]), timeout=600)) == []
    assert grid.train_trace.below_minimum and grid.train_trace.late == [2, 3]


def test_messages_expire_with_the_deadline():
    grid = DeadlineGrid(ScriptedGrid({1: 0.0}), deadline_s=7.0, poll_s=0.05)
    msgs = _messages([1])
    grid.send_and_receive(msgs, timeout=600)
    assert msgs[0].metadata.ttl == pytest.approx(7.0)


class ErrorGrid(ScriptedGrid):
    """Gateway 2's message expires (the SuperLink answers for it, under its own id 0); gateway 3's ClientApp raises."""

    def pull_messages(self, ids):
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        out = []
        for mid in list(ids):
            node, _ = self.pushed[mid]
            src, err = {2: (0, Error(ErrorCode.MESSAGE_UNAVAILABLE, "Error: Message Unavailable - expired")),
                        3: (3, Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                     "<class 'ValueError'>:<'no column \"T30\"'>"))}.get(node, (node, None))
            md = Metadata(run_id=1, message_id=f"r{mid}", src_node_id=src, dst_node_id=0, reply_to_message_id=mid,
                          group_id="", created_at=time.time(), ttl=60, message_type=MessageType.TRAIN)
            out.append(Message(err, metadata=md) if err else
                       Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), metadata=md))
        return out


def test_an_expired_message_is_late_and_a_clientapp_error_is_named():
    grid = DeadlineGrid(ErrorGrid({1: 0.0, 2: 0.0, 3: 0.0}), deadline_s=1, poll_s=0.01)
    grid.send_and_receive(_messages([1, 2, 3]), timeout=600)
    trace = grid.train_trace
    assert trace.late == [2] and trace.errors == [3] and list(trace.replied) == [1]
    assert trace.reasons == {3: 'ValueError: no column "T30"'}
