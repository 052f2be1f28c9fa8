"""The per-round log of a run: ``metrics.jsonl``, one line per round, written as it happens."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from iiotfl.links.counters import read_wire
from iiotfl.links.outages import Outages
from iiotfl.links.profiles import (
    GatewayProfile,
    device_compute,
    gateway_profiles,
    link_time,
    round_energy,
    transfer_time,
)
from iiotfl.privacy.ledger import keep_rounds, unpadded
from iiotfl.server.rounds import DeadlineGrid, RoundTrace
from iiotfl.strategies import strategy_spec, wire


class RoundLog:
    """Collects per-round figures and appends them to ``metrics.jsonl`` as they happen.

    Per gateway and round: application bytes (Flower message payload, both ways), wire
    bytes (its link's counters on a shaped fleet, which the launcher writes to ``wire.json``),
    and the round time split into compute (the ClientApp's handler), transfer (bytes over the
    link rates plus round trips, ``links/profiles.py``) and waiting (the rest: Flower's polling, process start-up,
    queueing behind other gateways, outages). ``bound_s`` = compute + transfer;
    ``sim_s`` is the simulated clock (bound + Flower's overhead + outage waiting). ``radio_j``,
    ``compute_j``, ``total_j``: the round's estimated energy on the gateway (:meth:`_energy`).
    """

    def __init__(self, path: Path, cfg: dict[str, Any], grid: DeadlineGrid, simulated: bool,
                 keep_upto: int | None = None) -> None:
        self.path = path
        kept = keep_rounds(path, keep_upto)  # a resumed run keeps its completed rounds
        self.start = time.time()
        self.last = self.start
        self.grid = grid
        self.simulated = simulated  # engine=sim: the round time is the simulated clock's
        self.clients: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = kept
        self.profiles = {p.index: p for p in gateway_profiles(cfg)}
        self.node_partition: dict[int, int] = {}
        self.rejected: Callable[[], Mapping[int, str]] = dict  # the strategy's left-out updates of the round
        # strategy=fedbuff: the version just made (what it applied and dropped, its clock); None: a round
        self.version_info: Callable[[], Mapping[str, Any] | None] = lambda: None
        self.run_dir = path.parent
        self.counters = self.read_counters()
        # engine=sim: a simulated clock that also knows the outage schedule
        self.outages = Outages(cfg, [])
        self.deadline = float(cfg["fleet"]["round_timeout"])
        self.sim_clock = 0.0
        # exchanges a round needs after the train one (decrypt, unmask, SecAgg+'s stages): on the
        # simulated clock each costs a round trip and Flower's per-exchange overhead
        self.extra_exchanges = strategy_spec(cfg).extra_exchanges

    def read_counters(self) -> dict[int, dict[str, int]]:
        """Each shaped gateway's wire byte counters, as the launcher last wrote them (``wire.json``)."""
        return read_wire(self.run_dir) or {}

    def _timing(self, part: int, prof: GatewayProfile, c: dict[str, Any], measured: float,
                pushed: float, replied: float) -> dict[str, Any]:
        """An aggregated gateway's bytes and round time split: compute, transfer, waiting, simulated."""
        compute = float(c[wire.T_END] - c[wire.T_START])
        objects = (c.get(wire.OBJECTS_DOWN), c.get(wire.OBJECTS_UP))
        transfer = transfer_time(prof.link, c[wire.BYTES_DOWN], c[wire.BYTES_UP], *objects)
        wait_outage = 0.0
        if self.simulated:
            wait_outage = self.outages.up_again(part, self.sim_clock, len(self.rows)) - self.sim_clock
        return dict(
            status="aggregated", bytes_down=c[wire.BYTES_DOWN], bytes_up=c[wire.BYTES_UP],
            round_s=measured, compute_s=compute, transfer_s=transfer,
            wait_s=max(0.0, measured - compute - transfer),
            # of the waiting: before the ClientApp process existed (Flower's pull interval),
            # its start (a fork or an interpreter and imports; the FAB), waiting in it for the
            # message's objects (warm runtime only: else part of the start), after the reply left
            before_process_s=float(c[wire.T_PROC]) - pushed if wire.T_PROC in c else None,
            **self._process_split(c),
            after_reply_s=replied - float(c[wire.T_END]),
            bound_s=compute + transfer,
            sim_s=link_time(prof.link, prof.device, compute, c[wire.BYTES_DOWN], c[wire.BYTES_UP],
                            outage_wait_s=wait_outage, measured_on_share=1.0 if self.simulated else None,
                            objects_down=objects[0], objects_up=objects[1])
            + self.extra_exchanges * link_time(prof.link, prof.device, 0.0, 0, 0),
            train_loss=c.get(wire.TRAIN_LOSS),
        )

    @staticmethod
    def _process_split(c: dict[str, Any]) -> dict[str, float | None]:
        """The task process's start (its own start, FAB, app) and, apart from it, its wait for the message."""
        if wire.T_PROC not in c:
            return {"startup_s": None, "message_s": None}
        whole = float(c[wire.T_START] - c[wire.T_PROC])
        if wire.T_PULL not in c or wire.T_PULLED not in c:
            return {"startup_s": whole, "message_s": None}
        message = float(c[wire.T_PULLED] - c[wire.T_PULL])
        return {"startup_s": whole - message, "message_s": message}

    def _gateway_row(self, node: int, pushed: float, trace: RoundTrace, counters: dict) -> dict[str, Any]:
        """One sampled gateway's row: what it sent, its round time split, its link's wire bytes."""
        c = trace.metrics.get(node)
        part = self.node_partition.get(node)
        if part is None and c is not None and "partition" in c:  # joined after the statistics query
            part = self.node_partition[node] = int(c["partition"])
        prof = self.profiles.get(part) if part is not None else None
        row: dict[str, Any] = {"partition": part, "node": node, "class": prof.label if prof else None}
        if c is not None:
            row["metrics"] = {k: v for k, v in unpadded(c).items() if k.startswith("dp-")}
        rejected = self.rejected().get(node)
        if rejected is not None:  # it replied, the server left its update out (malformed, too large)
            row.update(status="rejected", reason=rejected, bytes_up=c.get(wire.BYTES_UP) if c else None)
        elif c is not None and c.get(wire.DP_STOPPED):
            row.update(status="budget-spent", bytes_up=0, epsilon=c.get(wire.DP_EPSILON))
        elif node in trace.replied and c is not None and prof is not None and part is not None:
            row.update(self._timing(part, prof, c, trace.replied[node] - pushed, pushed, trace.replied[node]))
            if trace.below_minimum:  # it replied, but too few did: the round aggregated nothing
                row["status"] = "skipped"
        elif node in trace.extra and c is not None:  # replied beyond the first K: sent, not aggregated
            row.update(status="extra", bytes_down=c.get(wire.BYTES_DOWN), bytes_up=c.get(wire.BYTES_UP))
        else:
            row["status"] = ("late" if node in trace.late else "extra" if node in trace.extra
                             else "error" if node in trace.errors else "unknown")
            if node in trace.reasons:
                row["reason"] = trace.reasons[node]
        if node in trace.resent:  # the SuperLink saw it offline mid-round; its message went again when it was back
            row["resent"] = trace.resent[node]
        if part in counters and part in self.counters:
            row["wire_up"] = counters[part]["up"] - self.counters[part]["up"]
            row["wire_down"] = counters[part]["down"] - self.counters[part]["down"]
        if prof is not None:
            row.update(self._energy(prof, row))
        return row

    def _energy(self, prof: GatewayProfile, row: dict[str, Any]) -> dict[str, Any]:
        """The round's estimated energy on one gateway (``links/profiles.py``: round_energy): its wire bytes
        where its link counted them, else the application bytes (``energy_bytes`` says which); one connection
        per message exchange it answered (the train exchange and the strategy's extra ones); its compute
        seconds, on engine=sim rescaled to the device's CPU share as the simulated clock does."""
        wire_counted = "wire_up" in row
        up, down = (row["wire_up"], row["wire_down"]) if wire_counted else (row.get("bytes_up"), row.get("bytes_down"))
        exchanges = 1 + self.extra_exchanges if row.get("bytes_up") is not None else 0
        compute = device_compute(prof.device, row.get("compute_s") or 0.0, 1.0 if self.simulated else None)
        energy = round_energy(prof.link, prof.device, up or 0, down or 0, exchanges, compute)
        return {**energy, "energy_bytes": "wire" if wire_counted else "application"}

    def _gateways(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        trace = self.grid.train_trace
        now_counters = self.read_counters()
        self.clients = [unpadded(trace.metrics[n]) for n in trace.replied if n in trace.metrics]
        rows = [self._gateway_row(node, pushed, trace, now_counters) for node, pushed in trace.sent.items()]
        self.counters = now_counters
        aggregated = [r for r in rows if r.get("status") == "aggregated"]
        timed = [r for r in rows if "sim_s" in r]  # replied in time (in a skipped round too)
        if self.simulated:
            # on the simulated clock a gateway past the deadline would have been late
            for r in timed:
                if r["sim_s"] > self.deadline:  # would have missed the deadline (outage, slow link)
                    r["sim_late"], r["sim_s"] = True, self.deadline
        sim_round = min(self.deadline, max((r["sim_s"] for r in timed), default=0.0))
        if self.simulated:
            self.sim_clock += sim_round
        summary = {
            "sampled": len(trace.sent),
            "aggregated": len(aggregated),
            "late": sorted(r["partition"] for r in rows if r["status"] == "late" and r["partition"] is not None),
            "extra": sorted(r["partition"] for r in rows if r["status"] == "extra" and r["partition"] is not None),
            "skipped": trace.below_minimum,
            "train_s": trace.ended - trace.started,
            "push_s": trace.push_s,  # the ServerApp handing the round's messages to the SuperLink
            "sim_round_s": sim_round,
            "bound_round_s": max((r["bound_s"] for r in timed), default=0.0),
            "sim_late": sorted(r["partition"] for r in timed if r.get("sim_late")),
        }
        return sorted(rows, key=lambda r: (r["partition"] is None, r["partition"])), summary

    def _version_gateways(self, info: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """strategy=fedbuff: a version's rows — each applied update as an aggregated gateway (bytes, times,
        energy, its DP metrics for the ledger) with its sequence number, base version, staleness and weight;
        each dropped reply as rejected (or error), with why."""
        applied = list(info.get("applied") or [])
        trace = RoundTrace(sent={a["node"]: a["sent"] for a in applied},
                           replied={a["node"]: a["arrived"] for a in applied},
                           metrics={a["node"]: dict(a["metrics"]) for a in applied})
        now_counters = self.read_counters()
        self.clients = [unpadded(a["metrics"]) for a in applied]
        by_node = {a["node"]: a for a in applied}
        rows = []
        for node, pushed in trace.sent.items():
            row = self._gateway_row(node, pushed, trace, now_counters)
            a = by_node[node]
            row.update(seq=a["seq"], base_version=a["base"], staleness=a["staleness"], weight=a["weight"])
            if self.simulated and a.get("sim_done") is not None:
                row["sim_s"] = a["sim_done"] - a["sim_sent"]
            rows.append(row)
        self.counters = now_counters
        for d in info.get("dropped") or []:
            part = self.node_partition.get(d["node"], d.get("metrics", {}).get("partition"))
            prof = self.profiles.get(part) if part is not None else None
            reason = str(d["reason"])
            status = ("error" if reason.startswith("error") else "budget-spent" if "budget" in reason
                      else "rejected")
            rows.append({"partition": part, "node": d["node"], "class": prof.label if prof else None,
                         "status": status,
                         "reason": d["reason"], "seq": d["seq"], "base_version": d["base"],
                         "bytes_up": 0 if status == "budget-spent" else d.get("metrics", {}).get(wire.BYTES_UP),
                         "epsilon": d.get("metrics", {}).get(wire.DP_EPSILON),
                         "metrics": {k: v for k, v in unpadded(d.get("metrics") or {}).items() if k.startswith("dp-")}})
        previous = self.sim_clock if self.simulated else (self.rows[-1].get("time_s", 0.0) if self.rows else 0.0)
        if self.simulated:
            self.sim_clock = float(info["time_s"])
        summary = {
            "version": info["version"],
            "time_s": info["time_s"],  # when the version was made: simulated (engine=sim) or measured seconds
            "clock": "simulated" if self.simulated else "measured",
            "sampled": len(rows), "aggregated": len(applied), "late": [], "extra": [], "skipped": not applied,
            "train_s": time.time() - self.last, "push_s": 0.0,
            "sim_round_s": float(info["time_s"]) - previous,
            "bound_round_s": max((r.get("bound_s", 0.0) for r in rows), default=0.0), "sim_late": [],
            "applied": [{k: a[k] for k in ("node", "seq", "base", "staleness", "weight")}
                        | {"partition": self.node_partition.get(a["node"])} for a in applied],
            "dropped": [{k: d[k] for k in ("node", "seq", "base", "reason")} for d in info.get("dropped") or []],
            "staleness_mean": info.get("staleness_mean"), "staleness_max": info.get("staleness_max"),
        }
        return sorted(rows, key=lambda r: (r["partition"] is None, r["partition"] or 0)), summary

    def write(self, server_round: int, evaluation: dict[str, float], privacy: dict[str, float] | None = None) -> None:
        now = time.time()
        info = self.version_info() if server_round else None
        if info is not None:
            gateways, summary = self._version_gateways(info)
        else:
            gateways, summary = self._gateways() if server_round else ([], {})
        device_eps = [g["metrics"][wire.DP_EPSILON] for g in gateways if wire.DP_EPSILON in g.get("metrics", {})]
        if device_eps:
            privacy = {**(privacy or {}), "device_epsilon_max": max(device_eps)}
        row = {
            "round": server_round,
            "time": now - self.start,
            "round_time": now - self.last if server_round else 0.0,
            "server": evaluation,
            "privacy": privacy or {},
            **summary,
            "clients": self.clients,
            "gateways": gateways,
        }
        self.last = now
        self.clients = []
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def energy_per_class(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The estimated energy of each gateway class (link/device) over the rounds of ``metrics.jsonl``: per
    sampled gateway and round (``*_per_round``), over the run for the whole class (``radio_j``, ``compute_j``,
    ``total_j``) and per gateway of the class (``total_j_per_gateway``); ``updates``: its aggregated replies;
    ``bytes``: the bytes it counts (``wire``, ``application`` or both). metrics.json's ``energy_per_class``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        for g in r.get("gateways") or []:
            if "radio_j" in g:
                groups.setdefault(g.get("class") or "?", []).append(g)
    out = {}
    for cls, gs in sorted(groups.items()):
        radio, compute = sum(g["radio_j"] for g in gs), sum(g["compute_j"] for g in gs)
        gateways = len({g.get("partition") for g in gs})
        out[cls] = {
            "gateways": gateways, "gateway_rounds": len(gs),
            "updates": sum(g.get("status") == "aggregated" for g in gs),
            "bytes": " and ".join(sorted({str(g.get("energy_bytes")) for g in gs})),
            "radio_j_per_round": radio / len(gs), "compute_j_per_round": compute / len(gs),
            "total_j_per_round": (radio + compute) / len(gs),
            "radio_j": radio, "compute_j": compute, "total_j": radio + compute,
            "total_j_per_gateway": (radio + compute) / gateways,
        }
    return out
