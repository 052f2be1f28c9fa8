"""Intermittent connectivity: take gateways' links down and up during a run.

``fleet.outage.mode``:

* ``periodic``: every ``period_s`` (from ``offset_s`` after the first round starts)
  the link is down for ``down_s``;
* ``random``: up-times and down-times drawn from exponentials with means ``mtbf_s`` and
  ``mttr_s`` (seeded by ``seed`` and the gateway index, so a run can be repeated);
* ``rounds``: down for the whole of the listed rounds (a scripted outage for tests
  and demos: down when the previous round is logged, up when this one is).

Applies to ``fleet.outage.gateways`` (``all`` or a list of indices). Every change is
appended to ``outages.jsonl`` (time since the first round, round, gateway, state). A
link is "down" as a cable pulled: its host-side veth is set down, so nothing crosses.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Mapping

OUTAGE_MODES = ("none", "periodic", "random", "rounds")  # fleet.outage.mode


class Outages:
    def __init__(self, cfg: Mapping[str, Any], gateways: list, log: Path | None = None) -> None:
        spec = cfg["fleet"].get("outage") or {"mode": "none"}
        self.mode = spec.get("mode", "none")
        self.spec = spec
        chosen = spec.get("gateways", "all")
        idx = None if chosen in (None, "all") else {int(i) for i in chosen}
        self.gateways = {g.profile.index: g for g in gateways if idx is None or g.profile.index in idx}
        n = int(cfg["fleet"]["gateways"])
        self.indices = set(range(n)) if idx is None else idx
        self.log = log
        self.down: set[int] = set()
        self.t0: float | None = None
        self.seed = int(cfg.get("seed", 0))
        self.schedule: dict[int, list[tuple[float, float]]] = {}

    def _random_schedule(self, index: int, horizon: float) -> list[tuple[float, float]]:
        rng = random.Random(self.seed * 100_003 + index)
        t, out = 0.0, []
        mtbf, mttr = float(self.spec["mtbf_s"]), float(self.spec["mttr_s"])
        while t < horizon:
            start = t + rng.expovariate(1 / mtbf)
            end = start + rng.expovariate(1 / mttr)
            out.append((start, end))
            t = end
        return out

    def up_again(self, index: int, t: float, current_round: int) -> float:
        """When the link of gateway ``index``, asked at ``t`` (seconds since the first round) in
        ``current_round``, is up: ``t`` if it is up now, ``inf`` if not again this round. Drives
        the real links (:meth:`tick`) and the simulated clock of engine=sim alike."""
        if self.mode == "none" or index not in self.indices:
            return t
        if self.mode == "rounds":
            return float("inf") if current_round in {int(r) for r in self.spec.get("rounds") or []} else t
        if self.mode == "periodic":
            off, period, down = float(self.spec["offset_s"]), float(self.spec["period_s"]), float(self.spec["down_s"])
            if t < off:
                return t
            phase = (t - off) % period
            return t + (down - phase) if phase < down else t
        if index not in self.schedule:
            self.schedule[index] = self._random_schedule(index, 7 * 24 * 3600)
        for a, b in self.schedule[index]:
            if a <= t < b:
                return b
        return t

    def tick(self, rows: list[dict[str, Any]]) -> None:
        """Apply the schedule; ``rows`` are the rounds logged so far (round r runs when r rows exist)."""
        if self.mode == "none" or not self.gateways or not rows:
            return
        now = time.time()
        if self.t0 is None:
            self.t0 = now
        current = len(rows)
        for index, gw in self.gateways.items():
            want = self.up_again(index, now - self.t0, current) > now - self.t0
            if want != (index in self.down):
                gw.set_up(not want)
                (self.down.add if want else self.down.discard)(index)
                if self.log is None:
                    continue
                with self.log.open("a") as fh:
                    fh.write(json.dumps({"t": now - self.t0, "round": current, "gateway": index,
                                         "state": "down" if want else "up"}) + "\n")

    def restore(self) -> None:
        for index in sorted(self.down):
            self.gateways[index].set_up(True)
        self.down.clear()
