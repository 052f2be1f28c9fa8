"""Rounds that never hang: a deadline, the first K replies, a minimum to aggregate.

:class:`DeadlineGrid` wraps the Grid the ServerApp receives. The strategy calls
``send_and_receive`` as usual; this one pushes the messages, polls for replies every
``poll_s`` (Flower's own grid sleeps 3 s between polls) and returns as soon as

* ``need`` replies arrived (over-selection: the first K are kept), or
* every sampled gateway replied, or
* the round deadline passed.

Fewer than ``min_replies`` replies: none are returned, the round aggregates nothing
and the global model stays as it was. Every sampled gateway that did not make it is
listed as late. Messages carry the deadline as their TTL, so a gateway that comes back
after the deadline does not train on a stale round; it simply gets the next one.

A gateway the SuperLink declares offline mid-round (heartbeats lost in an outage) has its
message deleted there (answered NODE_UNAVAILABLE, or MESSAGE_UNAVAILABLE before the TTL), and a
reply it sends later is refused. With ``resend_offline``
(plaintext-uplink strategies) such a gateway is sent the same message again as soon as
the SuperLink sees it online, while the round lasts: a short outage costs the round the
outage, as on the simulated clock, not the whole deadline. A message can also be lost
without the SuperLink noticing (pulled just as the link went down: the SuperLink counts it
delivered, the gateway never got it); ``resend_silent_s`` (``fleet.resend_after_s``) sends it
again to a gateway that is online and silent that long. The first reply counts; the other
copy's reply is ignored.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from iiotfl.compat.flower import RECORD_KEY_CONFIGS


@dataclass
class RoundTrace:
    """What happened to one ``send_and_receive`` call."""

    sent: dict[int, float] = field(default_factory=dict)      # node -> push time (when the push began)
    push_s: float = 0.0                                       # how long the ServerApp's push took
    replied: dict[int, float] = field(default_factory=dict)   # node -> reply arrival time (kept)
    extra: list[int] = field(default_factory=list)            # replied after the first K
    resent: dict[int, int] = field(default_factory=dict)      # node -> times its message was sent again
    sent_again: dict[int, float] = field(default_factory=dict)  # node -> when it was last sent again
    late: list[int] = field(default_factory=list)             # no reply by the deadline
    errors: list[int] = field(default_factory=list)           # replied with an error
    reasons: dict[int, str] = field(default_factory=dict)    # node -> why its reply was an error
    metrics: dict[int, dict] = field(default_factory=dict)    # node -> the reply's metrics
    nodes: dict[str, int] = field(default_factory=dict)       # message id -> the node it was sent to
    below_minimum: bool = False
    started: float = 0.0
    ended: float = 0.0


# What the SuperLink answers for a gateway that did not reply: its message expired with the deadline,
# or the node went offline. Such a gateway is late, not in error.
RESEND_CHECK_S = 1.0  # how often a round asks the SuperLink whether an offline gateway is back
UNDELIVERED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)
# Before the deadline (the messages' TTL) these mean the SuperLink deleted the message: it saw the gateway offline
DELETED = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE)


def error_reason(reply: Message) -> str:
    """A failed gateway's one-line reason, from the error its SuperNode (or the SuperLink) returned."""
    text = (reply.error.reason or "").strip()
    raised = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", text, re.S)  # a ClientApp's exception
    if raised:
        text = f"{raised[1]}: {raised[2]}"
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"error code {reply.error.code}"


def _trains(msg: Message) -> bool:
    """Whether a TRAIN message makes the gateway train (SecAgg+'s key stages do not)."""
    configs: ConfigRecord | dict[str, str] = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
    stage = configs.get("stage")
    return stage in (None, "collect_masked_vectors")


class DeadlineGrid(Grid):
    def __init__(self, grid: Grid, deadline_s: float, min_replies: int = 1, poll_s: float = 0.1) -> None:
        self.grid = grid
        self.deadline_s = float(deadline_s)
        self.min_replies = int(min_replies)
        self.poll_s = poll_s
        self.need: int | None = None  # set by the strategy's sampling hook for the next call
        self.resend_offline = False   # send a gateway declared offline its message again once it is back
        self.resend_silent_s: float | None = None  # ... and one online but silent this long (a message lost in
                                                   # an outage: pulled just as its link went down)
        self.trace = RoundTrace()
        self.train_trace = RoundTrace()  # the last train round's trace

    # -- plain delegation ----------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    # -- the round -----------------------------------------------------------------------
    def on_sampled(self, server_round: int, nodes: list[int], need: int) -> None:  # noqa: ARG002
        self.need = need

    def sender(self, reply: Message) -> int:
        """The gateway a reply is about: the SuperLink answers for an offline node under its own id."""
        return self.trace.nodes.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _send_again(self, nodes: list[int], by_node: dict[int, Message], trace: RoundTrace, end: float,
                    why: str) -> dict[str, int]:
        """Send ``nodes`` their round's message anew (the same content, the rest of the deadline as TTL);
        returns new message id -> node."""
        again = [Message(content=by_node[n].content, dst_node_id=n, message_type=by_node[n].metadata.message_type,
                         group_id=by_node[n].metadata.group_id, ttl=max(end - time.time(), 1.0)) for n in nodes]
        new_ids = list(self.grid.push_messages(again))
        for node in nodes:
            trace.resent[node] = trace.resent.get(node, 0) + 1
            trace.sent_again[node] = time.time()
        log(INFO, "gateway(s) %s %s: their message sent again", ", ".join(map(str, nodes)), why)
        sent = {mid: m.metadata.dst_node_id for mid, m in zip(new_ids, again)}
        trace.nodes.update(sent)
        return sent

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        trace = RoundTrace(started=time.time())
        self.trace = trace
        if messages and messages[0].metadata.message_type == MessageType.TRAIN and _trains(messages[0]):
            self.train_trace = trace
        if not messages:
            trace.ended = trace.started
            return []
        limit = min(self.deadline_s, timeout) if timeout else self.deadline_s
        for msg in messages:
            msg.metadata.ttl = max(limit, 1.0)
        need = min(self.need or len(messages), len(messages))
        self.need = None
        pushing = time.time()  # a gateway may take its message before the last one is pushed
        pushed_ids = list(self.grid.push_messages(messages))
        trace.push_s = time.time() - pushing
        trace.sent = {m.metadata.dst_node_id: pushing for m in messages}
        trace.nodes = {mid: m.metadata.dst_node_id for mid, m in zip(pushed_ids, messages)}
        ids = dict(trace.nodes)  # outstanding message id -> node (a gateway sent its message again has two)
        end = trace.started + limit
        kept: list[Message] = []
        by_node = {m.metadata.dst_node_id: m for m in messages}
        offline: dict[int, Message] = {}  # node -> the SuperLink's answer that its message is gone, until it is back
        checked = 0.0
        while ids or offline:
            for reply in self.grid.pull_messages(set(ids)) if ids else []:
                node = self.sender(reply)
                ids.pop(reply.metadata.reply_to_message_id, None)
                if reply.has_error() and reply.error.code in UNDELIVERED and node in ids.values():
                    continue  # another copy of its message is still out
                if node in trace.replied or node in trace.extra or node in trace.errors:
                    continue  # a second copy answered too: counted once
                for mid in [m for m, n in ids.items() if n == node]:
                    del ids[mid]
                if not reply.has_error() and "metrics" in reply.content:
                    trace.metrics[node] = dict(reply.content["metrics"])
                if reply.has_error():
                    if reply.error.code in DELETED and self.resend_offline and time.time() < end - 1.0:
                        offline[node] = reply  # kept as the answer only if the gateway does not come back
                        continue
                    if reply.error.code not in UNDELIVERED:  # the gateway's own error; undelivered: late
                        trace.errors.append(node)
                        trace.reasons[node] = error_reason(reply)
                    kept.append(reply)
                elif len([r for r in kept if not r.has_error()]) < need:
                    trace.replied[node] = time.time()
                    kept.append(reply)
                else:
                    trace.extra.append(node)
            if len(trace.replied) >= need or time.time() >= end:
                break
            if self.resend_offline and time.time() - checked >= RESEND_CHECK_S:
                checked = time.time()
                online = set(self.grid.get_node_ids())
                back = [n for n in offline if n in online]
                for node in back:
                    del offline[node]
                if back:
                    ids.update(self._send_again(back, by_node, trace, end, "back after the SuperLink saw them offline"))
                silent = sorted({n for n in ids.values() if n in online and self.resend_silent_s
                                 and checked - trace.sent_again.get(n, trace.sent[n]) >= self.resend_silent_s})
                if silent:
                    ids.update(self._send_again(silent, by_node, trace, end,
                                                f"silent for fleet.resend_after_s ({self.resend_silent_s:g} s)"))
            time.sleep(self.poll_s)
        kept.extend(offline.values())  # never back within the round: late, as before
        trace.late = sorted(set(trace.sent) - set(trace.replied) - set(trace.extra) - set(trace.errors))
        trace.ended = time.time()
        if len(trace.replied) < self.min_replies:
            trace.below_minimum = True
            return [r for r in kept if r.has_error()]
        return kept
