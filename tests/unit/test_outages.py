"""Outage schedules and the unshaped fallback, without starting a fleet."""

from __future__ import annotations

import json

from iiotfl.configs import compose
from iiotfl.links import namespaces, shaping
from iiotfl.links.outages import Outages
from iiotfl.server.launch import Deployment
from iiotfl.server.report import write_report


class FakeLink:
    def __init__(self, index):
        self.profile = type("P", (), {"index": index})()
        self.states = []

    def set_up(self, up):
        self.states.append(up)


def _outages(tmp_path, *overrides):
    cfg = compose(["fleet.gateways=3", *overrides])
    links = [FakeLink(i) for i in range(3)]
    return Outages(cfg, links, tmp_path / "outages.jsonl" if tmp_path else None), links


def test_rounds_mode_takes_the_link_down_for_exactly_those_rounds(tmp_path):
    out, links = _outages(tmp_path, "fleet.outage.mode=rounds", "fleet.outage.rounds=[2,3]", "fleet.outage.gateways=[1]")
    rows = [{"round": 0}]
    for r in range(1, 6):          # round r runs while r rows are logged
        out.tick(rows)
        rows.append({"round": r})
    out.restore()
    assert links[1].states == [False, True]   # down once for rounds 2-3, up again
    assert links[0].states == links[2].states == []
    events = [json.loads(x) for x in (tmp_path / "outages.jsonl").read_text().splitlines()]
    assert [(e["state"], e["round"]) for e in events] == [("down", 2), ("up", 4)]


def test_periodic_schedule():
    out, _ = _outages(None, "fleet.outage.mode=periodic", "fleet.outage.period_s=100", "fleet.outage.down_s=10",
                      "fleet.outage.offset_s=30")
    assert out.up_again(0, 5.0, 1) == 5.0                   # before the first outage
    assert out.up_again(0, 35.0, 1) == 40.0                 # inside it: up at 30 + 10
    assert out.up_again(2, 135.0, 1) == 140.0               # the next period
    assert out.up_again(1, 50.0, 1) == 50.0


def test_random_schedule_is_seeded_and_has_the_configured_means():
    a, _ = _outages(None, "fleet.outage.mode=random", "fleet.outage.mtbf_s=100", "fleet.outage.mttr_s=10")
    b, _ = _outages(None, "fleet.outage.mode=random", "fleet.outage.mtbf_s=100", "fleet.outage.mttr_s=10")
    sa, sb = a._random_schedule(0, 200_000), b._random_schedule(0, 200_000)
    assert sa == sb and sa != a._random_schedule(1, 200_000)
    downs = [e - s for s, e in sa]
    ups = [s2 - e1 for (_, e1), (s2, _) in zip(sa, sa[1:])]
    assert 8 < sum(downs) / len(downs) < 12 and 85 < sum(ups) / len(ups) < 115


def test_without_namespaces_the_fleet_falls_back_to_loopback_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(shaping, "availability", lambda: "not running as root (network namespaces and tc need root)")
    created = []
    monkeypatch.setattr(namespaces.LinkFleet, "create", lambda self, profiles: created.append(profiles))
    dep = Deployment(compose(["link=nb_iot"]), tmp_path)
    dep.setup_links()
    assert not created and dep.links is None
    links = json.loads((tmp_path / "links.json").read_text())
    assert links["emulation"].startswith("loopback, UNSHAPED: not running as root")

    (tmp_path / "launch.json").write_text(json.dumps({"status": "completed", "links": dep.emulation}))
    assert "**Links: loopback, UNSHAPED" in write_report(tmp_path).read_text().splitlines()[2]
