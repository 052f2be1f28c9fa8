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
after an outage does not train on a stale round; it simply gets the next one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from iiotfl.compat.flower import RECORD_KEY_CONFIGS


@dataclass
class RoundTrace:
    """What happened to one ``send_and_receive`` call."""

    sent: dict[int, float] = field(default_factory=dict)      # node -> push time (when the push began)
    push_s: float = 0.0                                       # how long the ServerApp's push took
    replied: dict[int, float] = field(default_factory=dict)   # node -> reply arrival time (kept)
    extra: list[int] = field(default_factory=list)            # replied after the first K
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
UNDELIVERED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)


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
        ids = set(pushed_ids)
        end = trace.started + limit
        kept: list[Message] = []
        while ids:
            for reply in self.grid.pull_messages(ids):
                ids.discard(reply.metadata.reply_to_message_id)
                node = self.sender(reply)
                if not reply.has_error() and "metrics" in reply.content:
                    trace.metrics[node] = dict(reply.content["metrics"])
                if reply.has_error():
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
            time.sleep(self.poll_s)
        trace.late = sorted(set(trace.sent) - set(trace.replied) - set(trace.extra) - set(trace.errors))
        trace.ended = time.time()
        if len(trace.replied) < self.min_replies:
            trace.below_minimum = True
            return [r for r in kept if r.has_error()]
        return kept
