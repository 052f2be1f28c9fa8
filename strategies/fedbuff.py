"""FedBuff: buffered asynchronous aggregation (Nguyen et al., 2022).

``strategy=fedbuff`` has no synchronous rounds. Every connected gateway always has at most
one train message outstanding and trains on the latest model it holds; the server keeps a
global model with a version number ``v`` (0: the initial model) and a buffer:

* **A reply.** Its update ``u`` (the codec's decoding, as :class:`CodecFedAvg` decodes it:
  new weights minus the view it started from) was trained from base version ``b``; its
  staleness is ``s = v - b``. A reply more than ``strategy.max_staleness`` versions old, a
  duplicate or replayed one (the same (gateway, sequence number) twice, or one for a message
  the server no longer waits for) is dropped and named in the version's log row.
* **The buffer.** Each update is weighted by num-examples × ``w(s) = (1 + s) ** -a``
  (``a = strategy.staleness_exponent``, FedBuff's polynomial, 0.5). With
  ``strategy.buffer_size`` (K) updates in it the server applies
  ``global += server_lr × Σ w_i n_i u_i / Σ n_i`` (:func:`aggregate`: the staleness weight
  discounts a stale update, as FedBuff's ``(1/K) Σ w_i u_i`` does, rather than only shifting
  the buffer's mix; a buffer of stale updates moves the model less), ``v += 1``,
  With ``strategy.rebase`` (the default) a stale update is first taken against today's model:
  ``u - (global_v - global_b)``, the gateway's model (its version's model + its update) minus
  the current one, so what the versions since ``b`` already moved is not applied twice (a
  gateway that trained from the initial model would otherwise add the first round's large
  move again on top of a model that made it; FedAsync's mixing of models, weighted by FedBuff's
  staleness weight).
  evaluates and logs the version (the ServerApp's evaluate callback: ``metrics.jsonl``,
  ledger, checkpoint) and sends each gateway whose update it just consumed a new message.
  No version within ``fleet.round_timeout``: whatever the buffer holds is applied (an empty
  buffer makes a version with the model unchanged), as a synchronous round's deadline.
* **Down.** A gateway's message carries the current model as a delta against the version it
  holds (``config["base-round"]``, the ClientApp's ``view-meta`` contract of
  ``codec_fedavg.py``: the wire's round is version + 1), encoded with the codec's downlink
  when ``codec.downlink=delta``, else the full model. The server tracks the exact view each
  gateway rebuilt (base view + decoded delta, :class:`ModelStore`), so a lossy downlink never
  drifts apart. A gateway whose message expired, or whose reply was dropped, gets the full model.
* **Clock.** engine=fleet: measured wall time. engine=sim: a discrete-event loop on the
  simulated clock of ``links/profiles.py`` — each job completes at its dispatch time + the
  link time of its measured compute and bytes (+ waiting out its simulated outage); the loop
  waits until every outstanding reply is in, then takes the earliest simulated completion.

``fleet.rounds`` is the number of versions the run makes. The strategy's state for the
version just made is :attr:`FedBuff.version_row` (the round log reads it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from iiotfl.configs import ConfigError, flag, integer, number
from iiotfl.links.outages import Outages
from iiotfl.links.profiles import gateway_profiles, link_time
from iiotfl.strategies import wire
from iiotfl.strategies.codec_fedavg import CodecFedAvg, encoded_record, record_arrays
from iiotfl.strategies.codecs import flatten, unflatten
from iiotfl.strategies.spec import BuildContext, StrategySpec

# What the SuperLink answers for a message that expired or whose gateway went offline
UNDELIVERED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)
NODES_EVERY_S = 1.0  # how often the fleet loop asks which gateways are connected


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """FedBuff's polynomial staleness weight ``(1 + s) ** -exponent``."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} < 0")
    return float((1.0 + staleness) ** -exponent)


def aggregate(global_: np.ndarray, updates: list[tuple[np.ndarray, float, float]], server_lr: float) -> np.ndarray:
    """``global + server_lr × Σ w_i n_i u_i / Σ n_i`` for updates ``(u_i, n_i, w_i)`` (num-examples n, staleness
    weight w), in float64."""
    total = sum(n for _, n, _ in updates)
    if not updates or total <= 0:
        return global_.copy()
    step = sum(w * n * u.astype(np.float64) for u, n, w in updates) / total
    return (global_.astype(np.float64) + server_lr * step).astype(np.float32)


class ModelStore:
    """The global model of every version some gateway still holds, and each gateway's exact view.

    With a lossless downlink a gateway's view is its version's model; with a lossy one it is
    its own base view + the decoded delta, kept per gateway (``own``)."""

    def __init__(self, initial: np.ndarray) -> None:
        self.models: dict[int, np.ndarray] = {0: initial}
        self.current = 0
        self.held: dict[int, int] = {}            # node -> the version it holds
        self.own: dict[int, np.ndarray] = {}      # node -> its view, where it differs from that version

    def add(self, version: int, model: np.ndarray) -> None:
        self.models[version], self.current = model, version
        self.prune()

    def hold(self, node: int, version: int, view: np.ndarray) -> None:
        self.held[node] = version
        if np.array_equal(view, self.models[version]):
            self.own.pop(node, None)
        else:
            self.own[node] = view
        self.prune()

    def forget(self, node: int) -> None:
        """What the gateway holds is unknown (its message expired): it gets the full model next."""
        self.held.pop(node, None)
        self.own.pop(node, None)
        self.prune()

    def view(self, node: int) -> tuple[int, np.ndarray] | None:
        if node not in self.held:
            return None
        version = self.held[node]
        return version, self.own.get(node, self.models[version])

    def prune(self) -> None:
        """Drop every version that neither is current nor held by a gateway."""
        keep = {self.current, *self.held.values()}
        for version in [v for v in self.models if v not in keep]:
            del self.models[version]


@dataclass
class Job:
    """One outstanding train message."""

    node: int
    seq: int                   # the gateway's sequence number: (node, seq) is applied at most once
    base: int                  # the version it trains from
    sent: float                # real time of the push
    sim_sent: float = 0.0      # engine=sim: simulated dispatch time
    msg_id: str = ""
    reply: Message | None = None
    arrived: float = 0.0
    sim_done: float | None = None  # engine=sim: simulated completion (inf: its link is down)


@dataclass
class Entry:
    """An update in the buffer."""

    job: Job
    update: np.ndarray
    examples: float
    staleness: int
    weight: float              # staleness weight × num-examples
    metrics: dict[str, Any] = field(default_factory=dict)


class FedBuff(CodecFedAvg):
    """The buffer, the versions and who holds which; the loops are in :func:`run`."""

    def __init__(self, *, buffer_size: int = 3, server_lr: float = 1.0, staleness_exponent: float = 0.5,
                 max_staleness: int = 10, rebase: bool = False, **common: Any) -> None:
        super().__init__(**common)
        self.rebase = bool(rebase)
        self.buffer_size = int(buffer_size)
        self.server_lr = float(server_lr)
        self.exponent = float(staleness_exponent)
        self.max_staleness = int(max_staleness)
        self.version = 0
        self.global_: np.ndarray = np.zeros(0, dtype=np.float32)
        self.template: dict[str, np.ndarray] = {}
        self.store = ModelStore(self.global_)
        self.seqs: dict[int, int] = {}
        self.jobs: dict[str, Job] = {}           # msg id -> outstanding job
        self.applied: set[tuple[int, int]] = set()
        self.buffer: list[Entry] = []
        self.dropped: list[dict[str, Any]] = []  # since the last version: node, seq, why
        self.retired: set[int] = set()           # gateways whose DP budget is spent
        self.version_row: dict[str, Any] | None = None

    def begin(self, model: Mapping[str, np.ndarray]) -> None:
        self.template = {k: np.asarray(v, dtype=np.float32) for k, v in model.items()}
        self.global_ = flatten(self.template).astype(np.float32)
        self.store = ModelStore(self.global_)

    # -- down ----------------------------------------------------------------------------
    def message(self, node: int, train_config: Mapping[str, Any], now: float, sim_now: float = 0.0,
                full: bool = False) -> tuple[Message, Job]:
        """A train message for ``node`` on the current version: a delta against the view it holds, the full
        model, or (version 0 of a fresh run with the delta downlink) the seeded model's digest."""
        cfg = ConfigRecord({**train_config, wire.SERVER_ROUND: self.version + 1})
        held = None if full else self.store.view(node)
        if full:
            self.store.forget(node)
        if self.downlink == "delta" and held is not None:
            base_version, base = held
            enc, view = self.encode_delta(self.global_, base)
            cfg[wire.BASE_ROUND] = base_version + 1
            content = RecordDict({"delta": encoded_record(enc), "config": cfg})
        elif self.version == 0 and self.seeded(self.template):
            view = self.global_
            cfg[wire.SEEDED_START] = str(self.seeded_start)
            content = RecordDict({"config": cfg})
        else:
            view = self.global_
            arrays = ArrayRecord({k: Array(v) for k, v in unflatten(self.global_, self.template).items()})
            content = RecordDict({"arrays": arrays, "config": cfg})
        self.store.hold(node, self.version, view)
        seq = self.seqs[node] = self.seqs.get(node, 0) + 1
        msg = Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
        return msg, Job(node=node, seq=seq, base=self.version, sent=now, sim_sent=sim_now)

    # -- up ------------------------------------------------------------------------------
    def drop(self, job: Job, why: str) -> None:
        log(INFO, "fedbuff: gateway %d's reply (seq %d) dropped: %s", job.node, job.seq, why)
        self.dropped.append({"node": job.node, "seq": job.seq, "base": job.base, "reason": why,
                             "metrics": dict(job.reply.content["metrics"]) if job.reply is not None
                             and not job.reply.has_error() and "metrics" in job.reply.content else {}})

    def accept(self, job: Job) -> bool:
        """Decode a finished job's reply into the buffer; False (and named in the log) if it is dropped."""
        reply = job.reply
        assert reply is not None, "accept() needs the job's reply"
        key = (job.node, job.seq)
        if key in self.applied:
            self.drop(job, "duplicate: this update was already applied")
            return False
        if reply.has_error():
            self.drop(job, f"error: {reply.error.reason}")
            return False
        staleness = self.version - job.base
        if staleness > self.max_staleness:
            self.drop(job, f"stale: {staleness} versions old > strategy.max_staleness={self.max_staleness}")
            return False
        metrics = dict(wire.metric_record(reply.content, "metrics"))
        if wire.UPDATE not in reply.content and metrics.get(wire.DP_STOPPED):
            self.retired.add(job.node)
            self.drop(job, "its privacy budget is spent; it sent no update")
            return False
        try:
            update = self.codec.decode(record_arrays(wire.array_record(reply.content, wire.UPDATE)),
                                       self.global_.size)
            self.check_norm(update)
        except (KeyError, ValueError, wire.RecordKindError) as err:
            log(WARNING, "fedbuff: gateway %d sent a malformed update: %s", job.node, err)
            self.rejected[job.node] = f"malformed update, left out: {err}"
            self.drop(job, f"malformed update: {err}")
            return False
        if self.rebase and staleness and job.base in self.store.models:
            # the gateway's model (its version's model + its update) taken against today's model: what the
            # versions since already moved is not applied a second time
            update = update - (self.global_ - self.store.models[job.base])
        examples = wire.as_float(metrics.get(wire.NUM_EXAMPLES, 1.0))
        weight = staleness_weight(staleness, self.exponent) * examples
        self.applied.add(key)
        self.buffer.append(Entry(job, update, examples, staleness, weight, metrics))
        return True

    def flush(self, time_s: float) -> dict[str, Any]:
        """Apply the buffer: a new version. Returns (and keeps as ``version_row``) what the log records."""
        entries, self.buffer = self.buffer, []
        self.global_ = aggregate(self.global_, [(e.update, float(e.examples), e.weight / max(e.examples, 1))
                                                for e in entries], self.server_lr)
        self.version += 1
        self.store.add(self.version, self.global_)
        total = sum(e.examples for e in entries) or 1.0
        stale = [e.staleness for e in entries]
        self.version_row = {
            "version": self.version, "time_s": time_s,
            "applied": [{"node": e.job.node, "seq": e.job.seq, "base": e.job.base, "staleness": e.staleness,
                         "examples": e.examples, "weight": e.weight / total,
                         "sent": e.job.sent, "arrived": e.job.arrived, "sim_sent": e.job.sim_sent,
                         "sim_done": e.job.sim_done, "metrics": e.metrics} for e in entries],
            "dropped": self.dropped,
            "staleness_mean": float(np.mean(stale)) if stale else None,
            "staleness_max": max(stale) if stale else None,
        }
        self.dropped = []
        self.rejected = {}
        return self.version_row

    def arrays(self) -> ArrayRecord:
        return ArrayRecord({k: Array(v) for k, v in unflatten(self.global_, self.template).items()})


# -- the loops ---------------------------------------------------------------------------------
class Loop:
    """What both engines' loops share: dispatch, receive, apply a version."""

    def __init__(self, grid: Grid, strategy: FedBuff, cfg: Mapping[str, Any], train_config: Mapping[str, Any],
                 evaluate: Callable[[int, ArrayRecord], Any], num_rounds: int) -> None:
        self.grid, self.fb, self.cfg = grid, strategy, cfg
        self.train_config = dict(train_config)
        self.evaluate, self.num_rounds = evaluate, num_rounds
        self.ttl = float(cfg["fleet"]["round_timeout"])
        silent = cfg["fleet"].get("resend_after_s")  # a job silent this long is taken as lost in an outage
        self.silent_s = float(silent) if silent else self.ttl + 5.0
        self.t0 = time.time()
        self.sim_now = 0.0
        self.last_version_at = 0.0  # the clock at the last version (deadline for the next one)
        self.idle: set[int] = set()
        self.fresh: set[int] = set()  # gateways whose next message must carry the full model

    def clock(self) -> float:
        return time.time() - self.t0

    def dispatch(self, nodes: list[int]) -> None:
        pairs = []
        for node in sorted(nodes):
            if node in self.fb.retired:
                continue
            msg, job = self.fb.message(node, self.train_config, time.time(), self.sim_now, full=node in self.fresh)
            msg.metadata.ttl = max(self.ttl, 1.0)
            pairs.append((msg, job))
            self.fresh.discard(node)
            self.idle.discard(node)
        if not pairs:
            return
        for mid, (_, job) in zip(self.grid.push_messages([m for m, _ in pairs]), pairs):
            job.msg_id = mid
            self.fb.jobs[mid] = job

    def pull(self) -> list[Job]:
        """Replies now in; an undelivered message's gateway is idle (it gets the full model when seen again)."""
        if not self.fb.jobs:
            return []
        done = []
        for reply in self.grid.pull_messages(list(self.fb.jobs)):
            job = self.fb.jobs.pop(reply.metadata.reply_to_message_id, None)
            if job is None:  # a reply for a message the server no longer waits for
                log(INFO, "fedbuff: a reply to message %s nobody waits for, dropped",
                    reply.metadata.reply_to_message_id)
                continue
            job.reply, job.arrived = reply, time.time()
            if reply.has_error() and reply.error.code in UNDELIVERED:
                self.expire(job)
                continue
            done.append(job)
        return done

    def expire(self, job: Job) -> None:
        log(INFO, "fedbuff: gateway %d's message (seq %d) expired or it went offline", job.node, job.seq)
        self.fb.jobs.pop(job.msg_id, None)
        self.fb.store.forget(job.node)
        self.fresh.add(job.node)
        self.idle.add(job.node)

    def take(self, job: Job) -> None:
        """A finished job: into the buffer, or dropped (then its gateway gets a fresh message now)."""
        if not self.fb.accept(job):
            if job.node not in self.fb.retired:
                self.fresh.add(job.node)
                self.dispatch([job.node])

    def apply(self, now: float) -> list[int]:
        """A new version: evaluated and logged; the gateways whose updates it consumed."""
        row = self.fb.flush(now)
        self.last_version_at = now
        log(INFO, "fedbuff: version %d from %d update(s), staleness %s", row["version"], len(row["applied"]),
            [a["staleness"] for a in row["applied"]])
        self.evaluate(self.fb.version, self.fb.arrays())
        return [a["node"] for a in row["applied"]]


def _fleet_loop(loop: Loop, poll_s: float = 0.1) -> None:
    """engine=fleet (and remote): real replies in their real order, measured wall time."""
    fb = loop.fb
    loop.dispatch(list(loop.grid.get_node_ids()))
    seen_at = time.time()
    while fb.version < loop.num_rounds:
        for job in loop.pull():
            loop.take(job)
        now = time.time()
        for job in [j for j in fb.jobs.values() if now - j.sent > min(loop.silent_s, loop.ttl + 5.0)]:  # no answer
            loop.expire(job)
        if len(fb.buffer) >= fb.buffer_size or loop.clock() - loop.last_version_at > loop.ttl:
            consumed = loop.apply(loop.clock())
            if fb.version < loop.num_rounds:
                loop.dispatch([n for n in consumed if n in set(loop.grid.get_node_ids())])
                loop.idle.update(n for n in consumed if n not in {j.node for j in fb.jobs.values()})
            continue
        if now - seen_at > NODES_EVERY_S:  # gateways come and go: a newly seen or returning one gets a message
            seen_at = now
            busy = {j.node for j in fb.jobs.values()} | {e.job.node for e in fb.buffer}
            connected = set(loop.grid.get_node_ids())
            loop.dispatch([n for n in connected - busy if n not in fb.retired])
        time.sleep(poll_s)


class SimClock:
    """engine=sim: each job's simulated completion (dispatch + link time + outage wait)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.profiles = {p.index: p for p in gateway_profiles(cfg)}
        self.outages = Outages(cfg, [])
        self.partition: dict[int, int] = {}

    def completion(self, job: Job, start: float, version: int) -> float:
        """When ``job``, (re)started at ``start`` in the making of version ``version`` + 1, is back."""
        assert job.reply is not None
        if job.reply.has_error() or "metrics" not in job.reply.content:
            return start
        c: dict[str, Any] = dict(job.reply.content["metrics"])
        part = wire.as_int(c.get("partition", self.partition.get(job.node, -1)))
        self.partition[job.node] = part
        prof = self.profiles.get(part)
        if prof is None:
            return start
        up = self.outages.up_again(part, start, version + 1)
        if up == float("inf"):
            return up
        compute = float(c[wire.T_END] - c[wire.T_START]) if wire.T_END in c and wire.T_START in c else 0.0
        return up + link_time(prof.link, prof.device, compute, float(c.get(wire.BYTES_DOWN, 0)),
                              float(c.get(wire.BYTES_UP, 0)), measured_on_share=1.0,
                              objects_down=c.get(wire.OBJECTS_DOWN), objects_up=c.get(wire.OBJECTS_UP))


def _sim_loop(loop: Loop, clock: SimClock, poll_s: float = 0.05) -> None:
    """engine=sim: wait for every outstanding reply, then apply them in simulated-completion order."""
    fb = loop.fb
    loop.dispatch(list(loop.grid.get_node_ids()))
    done: list[Job] = []  # replies in, not yet taken (their simulated completion is later)
    while fb.version < loop.num_rounds:
        while fb.jobs:  # every outstanding reply in (the simulation engine delivers them all)
            for job in loop.pull():
                job.sim_done = clock.completion(job, job.sim_sent, fb.version)
                done.append(job)
            if fb.jobs:
                time.sleep(poll_s)
        deadline = loop.last_version_at + loop.ttl
        finite = [j for j in done if j.sim_done is not None and j.sim_done != float("inf")]
        first = min(finite, key=lambda j: (j.sim_done, j.node), default=None)
        if first is None or (first.sim_done or 0.0) > deadline:  # nothing in before the deadline: a version now
            loop.sim_now = max(loop.sim_now, deadline)
            _sim_version(loop, clock, done)
            continue
        done.remove(first)
        loop.sim_now = max(loop.sim_now, first.sim_done or 0.0)
        loop.take(first)
        if len(fb.buffer) >= fb.buffer_size:
            _sim_version(loop, clock, done)


def _sim_version(loop: Loop, clock: SimClock, done: list[Job]) -> None:
    """Apply the buffer at the simulated now; dispatch the consumed gateways; restart jobs whose link is back."""
    consumed = loop.apply(loop.sim_now)
    for job in done:
        if job.sim_done == float("inf"):  # parked while its link was down: maybe up in this version
            job.sim_done = clock.completion(job, loop.sim_now, loop.fb.version)
    if loop.fb.version < loop.num_rounds:
        loop.dispatch(consumed)


def run(grid: Grid, context: Context, cfg: Mapping[str, Any], model: torch.nn.Module,  # noqa: ARG001
        train_config: dict[str, Any], evaluate: Callable[[int, ArrayRecord], Any], num_rounds: int,
        strategy: FedBuff, examples: Mapping[int, int]) -> tuple[ArrayRecord, dict]:  # noqa: ARG001
    """strategy=fedbuff: the buffered asynchronous loop of the run's engine, ``num_rounds`` versions."""
    strategy.begin({k: v.detach().numpy() for k, v in model.state_dict().items()})
    loop = Loop(grid, strategy, cfg, train_config, evaluate, num_rounds)
    evaluate(0, strategy.arrays())
    if cfg["engine"]["name"] == "sim":
        _sim_loop(loop, SimClock(cfg))
    else:
        _fleet_loop(loop)
    return strategy.arrays(), {}


def validate(cfg: Mapping[str, Any]) -> None:
    """strategy=fedbuff: the buffer, the staleness weight, and the combinations that cannot work."""
    gateways = int(cfg["fleet"]["gateways"])
    k = buffer_size(cfg) if cfg["strategy"].get("buffer_size") is None else integer(cfg, "strategy.buffer_size", 1)
    if k > gateways:
        raise ConfigError(f"config: strategy.buffer_size={k} > fleet.gateways={gateways}: the buffer could never "
                          "fill (each gateway has one update outstanding); lower strategy.buffer_size")
    number(cfg, "strategy.staleness_exponent", 0.0, 10.0)
    number(cfg, "strategy.server_lr", 0.0, 100.0, low_open=True)
    integer(cfg, "strategy.max_staleness", 0)
    flag(cfg, "strategy.rebase")
    if cfg["privacy"]["name"] == "client":
        raise ConfigError("config: strategy=fedbuff cannot carry privacy=client: Flower's DP wrappers clip and "
                          "noise the mean of one synchronous round; use privacy=sample (DP-SGD on each gateway)")
    fleet = cfg["fleet"]
    sampling = fleet.get("clients_per_round"), float(fleet.get("over_selection") or 0.0), float(fleet["fraction_train"])
    if sampling[0] or sampling[1] or sampling[2] != 1.0:
        raise ConfigError("config: strategy=fedbuff trains every connected gateway and strategy.buffer_size sets how "
                          "many updates a version takes; keep fleet.clients_per_round=null, fleet.over_selection=0 "
                          "and fleet.fraction_train=1.0")
    if cfg["engine"]["name"] not in ("sim", "fleet", "remote"):
        raise ConfigError(f"config: strategy=fedbuff runs on engine=sim, fleet or remote, not {cfg['engine']['name']}")


def buffer_size(cfg: Mapping[str, Any]) -> int:
    """K: ``strategy.buffer_size``, or (null) half the fleet rounded up. Half a 10-gateway mixed fleet was
    stable where 3 of 10 overshot (a stale first-round update applied on a model that already made that move)."""
    k = cfg["strategy"].get("buffer_size")
    return int(k) if k is not None else max(1, math.ceil(int(cfg["fleet"]["gateways"]) / 2))


def build(cfg: Mapping[str, Any], ctx: BuildContext) -> FedBuff:
    st = cfg["strategy"]
    return FedBuff(buffer_size=buffer_size(cfg), server_lr=float(st["server_lr"]),
                   staleness_exponent=float(st["staleness_exponent"]), max_staleness=int(st["max_staleness"]),
                   rebase=bool(st["rebase"]),
                   **ctx.common)


SPEC = StrategySpec(
    name="fedbuff", build=build, validate=validate, uplink="plaintext", client_dp=None, runner=run,
    resume_refusal="strategy=fedbuff's buffer and the gateways' versions live in the ServerApp, not in a checkpoint",
    describe="the codec's encoding of the update; the server sees each gateway's update (buffered, asynchronous)",
)
