"""Round deadline, first-K replies and minimum replies, against a scripted grid."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

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


class OutageGrid(ScriptedGrid):
    """Gateway 2 is offline (the SuperLink answers NODE_UNAVAILABLE for its first message, which it deleted) and
    online again ``back_s`` after the round starts (None: never); a message sent to it after that is answered."""

    def __init__(self, delays, back_s, code=5):  # 5: NODE_UNAVAILABLE
        super().__init__(delays)
        self.code = code
        self.back_at = None if back_s is None else time.time() + back_s
        self.to_two: list[Message] = []

    def get_node_ids(self):
        online = self.back_at is not None and time.time() >= self.back_at
        return [n for n in self.delays if n != 2 or online]

    def push_messages(self, messages):
        messages = list(messages)
        self.to_two += [m for m in messages if m.metadata.dst_node_id == 2]
        return super().push_messages(messages)

    def pull_messages(self, ids):
        from flwr.app import Error

        out = []
        for reply in super().pull_messages(ids):
            mid = reply.metadata.reply_to_message_id
            if self.pushed[mid][0] == 2 and mid == next(i for i, (n, _) in self.pushed.items() if n == 2):
                md = Metadata(run_id=1, message_id=f"r{mid}", src_node_id=0, dst_node_id=0, reply_to_message_id=mid,
                              group_id="", created_at=time.time(), ttl=60, message_type=MessageType.TRAIN)
                out.append(Message(Error(self.code, "Error: Node / Message Unavailable"), metadata=md))
            else:
                out.append(reply)
        return out


@pytest.mark.usefixtures("serverapp_identity")  # the message sent again is made as in a ServerApp
@pytest.mark.parametrize("code", [ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE])
def test_a_gateway_back_from_an_outage_is_sent_its_message_again_within_the_round(code):
    grid = DeadlineGrid(OutageGrid({1: 0.0, 2: 0.0}, back_s=0.3, code=code), deadline_s=5, poll_s=0.02)
    grid.resend_offline = True
    start = time.time()
    replies = list(grid.send_and_receive(_messages([1, 2]), timeout=600))
    assert time.time() - start < 2.5  # not the whole deadline
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2] and not any(r.has_error() for r in replies)
    trace = grid.train_trace
    assert trace.resent == {2: 1} and trace.late == [] and sorted(trace.replied) == [1, 2]
    first, again = grid.grid.to_two
    assert again.content is first.content and again.metadata.ttl <= 5  # the same message, the rest of the deadline


def test_a_gateway_that_stays_offline_is_late_and_without_resend_is_not_asked_again():
    grid = DeadlineGrid(OutageGrid({1: 0.0, 2: 0.0}, back_s=None), deadline_s=1.0, poll_s=0.02)
    grid.resend_offline = True
    replies = list(grid.send_and_receive(_messages([1, 2]), timeout=600))
    assert grid.train_trace.late == [2] and grid.train_trace.resent == {}
    assert [r.error.code for r in replies if r.has_error()] == [5]  # the SuperLink's answer is kept
    off = DeadlineGrid(OutageGrid({1: 0.0, 2: 0.0}, back_s=0.0), deadline_s=1.0, poll_s=0.02)
    start = time.time()
    off.send_and_receive(_messages([1, 2]), timeout=600)
    assert time.time() - start < 0.9  # every message answered: the round ends without waiting for gateway 2
    assert off.train_trace.late == [2] and len(off.grid.to_two) == 1


class LostPullGrid(ScriptedGrid):
    """Gateway 2 never answers its first message (the SuperLink counted it delivered as the link went down) but
    stays online; a copy sent later is answered. Gateway 3 answers every copy, slowly."""

    def pull_messages(self, ids):
        first_to_two = next(i for i, (n, _) in self.pushed.items() if n == 2)
        return [r for r in super().pull_messages(ids) if r.metadata.reply_to_message_id != first_to_two]


@pytest.mark.usefixtures("serverapp_identity")
def test_a_gateway_silent_past_resend_after_s_is_sent_its_message_again_and_counted_once():
    grid = DeadlineGrid(LostPullGrid({1: 0.0, 2: 0.0, 3: 0.9}), deadline_s=5, poll_s=0.02)
    grid.resend_offline, grid.resend_silent_s = True, 0.5
    start = time.time()
    replies = list(grid.send_and_receive(_messages([1, 2, 3]), timeout=600))
    assert time.time() - start < 2.5
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]  # gateway 3's second copy: not counted
    assert grid.train_trace.resent.get(2) == 1 and grid.train_trace.late == []
    unset = DeadlineGrid(LostPullGrid({1: 0.0, 2: 0.0}), deadline_s=1.0, poll_s=0.02)
    unset.resend_offline = True  # fleet.resend_after_s null: a silent gateway is waited for until the deadline
    unset.send_and_receive(_messages([1, 2]), timeout=600)
    assert unset.train_trace.late == [2] and unset.train_trace.resent == {}
