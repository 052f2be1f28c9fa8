"""The energy estimate: the profiles' constants, round_energy, the report's table and metrics.json.

Fast: the function against numbers worked out by hand, the profile checks, and a two-gateway
LTE-M / NB-IoT engine=sim run of two rounds replayed through the ServerApp's own round log
(``RoundLog`` with the replies' figures of a real run: 166,932 bytes down, 165,642 up, 14 and 5
objects), its ``report.md`` and its ``metrics.json`` (``app._finish``). The real run itself is
``tests/e2e/test_e2e.py::test_sim_engine_with_more_virtual_gateways``.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord

from iiotfl.configs import ConfigError, compose
from iiotfl.links.profiles import DeviceProfile, LinkProfile, gateway_profiles, link_profile, round_energy
from iiotfl.server import app
from iiotfl.server.checks import validate
from iiotfl.server.report import write_report
from iiotfl.server.roundlog import RoundLog, energy_per_class
from iiotfl.server.rounds import RoundTrace
from iiotfl.strategies import wire

MIX = ["engine=sim", "fleet.gateways=2", "fleet.rounds=2", "fleet.link_mix={lte_m:0.5,nb_iot:0.5}"]
DOWN, UP = 166_932, 165_642  # a real engine=sim run's train exchange (the default task's model, float32)


def test_round_energy_against_numbers_worked_out_by_hand():
    nb = LinkProfile("nb", up_kbit=80, down_kbit=100, tx_uj_per_byte=74, rx_uj_per_byte=12, connect_mj=550)
    pi = DeviceProfile("pi", cpu_share=0.3, power_w=5.0)
    # 165,642 B x 74 µJ = 12.257508 J; 166,932 B x 12 µJ = 2.003184 J; 1 connection x 550 mJ = 0.55 J
    # compute: 5 W x 2 s = 10 J
    assert round_energy(nb, pi, UP, DOWN, 1, 2.0) == pytest.approx(
        {"radio_j": 14.810692, "compute_j": 10.0, "total_j": 24.810692})
    # three exchanges (a strategy's two more), no compute: 14.260692 + 3 x 0.55
    assert round_energy(nb, pi, UP, DOWN, 3, 0.0)["radio_j"] == pytest.approx(15.910692)
    assert round_energy(LinkProfile("none"), DeviceProfile("d"), UP, DOWN, 1, 2.0) == {
        "radio_j": 0.0, "compute_j": 0.0, "total_j": 0.0}


def test_every_profile_has_its_constants_and_loopback_has_no_radio():
    for name in ("ethernet", "wifi", "lte_m", "nb_iot", "satellite"):
        link = link_profile(name)
        assert link.tx_uj_per_byte > 0 and link.rx_uj_per_byte > 0, name
    none = link_profile("none")
    assert (none.tx_uj_per_byte, none.rx_uj_per_byte, none.connect_mj) == (0, 0, 0)
    # per byte sent, NB-IoT costs more than LTE-M, which costs more than Wi-Fi and Ethernet
    assert (link_profile("nb_iot").tx_uj_per_byte > link_profile("lte_m").tx_uj_per_byte
            > link_profile("wifi").tx_uj_per_byte > link_profile("ethernet").tx_uj_per_byte)
    devices = {p.device.name: p.device.power_w for p in gateway_profiles(compose(
        ["fleet.gateways=2", "fleet.device_mix={gateway:0.5,sensor:0.5}"]))}
    assert devices == {"gateway": 10.0, "sensor": 5.0}


def test_a_profile_written_before_the_energy_keys_still_loads():
    cfg = {"fleet": {"gateways": 1}, "link": {"name": "old", "up_kbit": 100, "down_kbit": 100},
           "device": {"name": "old", "cpu_share": 1.0}}
    (profile,) = gateway_profiles(cfg)
    assert (profile.link.tx_uj_per_byte, profile.link.rx_uj_per_byte, profile.link.connect_mj) == (0, 0, 0)
    assert profile.device.power_w == 0


@pytest.mark.parametrize("override, says", [
    ("link.tx_uj_per_byte=-1", "config: link profile 'ethernet': tx_uj_per_byte=-1.0 is invalid; it must be a number >= 0 (microjoules per byte sent; 0: not counted)"),
    ("link.rx_uj_per_byte=-0.5", "config: link profile 'ethernet': rx_uj_per_byte=-0.5 is invalid; it must be a number >= 0 (microjoules per byte received; 0: not counted)"),
    ("link.connect_mj=-105", "config: link profile 'ethernet': connect_mj=-105.0 is invalid; it must be a number >= 0 (millijoules per connection; 0: not counted)"),
    ("link.connect_mj=nan", "config: link profile 'ethernet': connect_mj=nan is invalid; it must be a number >= 0 (millijoules per connection; 0: not counted)"),
    ("device.power_w=-5", "config: device profile 'gateway': power_w=-5.0 is invalid; it must be a number >= 0 (watts while training; 0: not counted)"),
    ("link.tx_uj_per_byte=lots", "config: link profile 'ethernet' has a non-numeric value; rates, rtt, jitter, loss and the energy figures are numbers"),
])
def test_a_negative_energy_constant_is_refused_in_one_line(override, says):
    with pytest.raises(ConfigError) as err:
        validate(compose([override]))
    assert str(err.value) == says


# -- a two-gateway LTE-M / NB-IoT run on engine=sim, replayed through the round log -----------------


def _reply(now: float, partition: int, compute_s: float) -> dict:
    return {wire.T_START: now - 1 - compute_s, wire.T_END: now - 1, wire.BYTES_DOWN: DOWN, wire.BYTES_UP: UP,
            wire.OBJECTS_DOWN: 14, wire.OBJECTS_UP: 5, wire.TRAIN_LOSS: 0.05, "partition": partition}


@pytest.fixture
def sim_run(tmp_path):
    """What the ServerApp of ``iiotfl run engine=sim fleet.gateways=2 fleet.rounds=2
    'fleet.link_mix={lte_m:0.5,nb_iot:0.5}'`` logs: round 0, then two rounds where both gateways reply."""
    cfg = compose(MIX)
    grid = SimpleNamespace(train_trace=None)
    log = RoundLog(tmp_path / "metrics.jsonl", cfg, grid, simulated=True)
    log.node_partition = {11: 0, 12: 1}
    log.write(0, {"rmse": 120.0})
    for server_round, compute in ((1, (1.5, 0.5)), (2, (1.0, 0.25))):
        now = time.time()
        grid.train_trace = RoundTrace(
            sent={11: now - 4, 12: now - 4}, replied={11: now, 12: now}, started=now - 4, ended=now,
            metrics={11: _reply(now, 0, compute[0]), 12: _reply(now, 1, compute[1])})
        log.write(server_round, {"rmse": 120.0 / (server_round + 1)})
    return tmp_path, cfg, log


def _energy_table(report: str) -> dict[str, dict[str, str]]:
    lines = report.split("### Energy per round, estimated", 1)[1].splitlines()
    rows = [[c.strip() for c in x.strip().strip("|").split(" | ")] for x in lines if x.startswith("| ")]
    head, *body = rows
    return {r[0]: dict(zip(head, r)) for r in body}


def test_the_report_has_an_energy_row_per_class_with_nb_iot_at_its_cost_per_byte(sim_run):
    run_dir, _, log = sim_run
    report = write_report(run_dir).read_text()
    table = _energy_table(report)
    assert list(table) == ["lte_m/gateway", "nb_iot/gateway"]
    nb, lte, gateway = link_profile("nb_iot"), link_profile("lte_m"), 10.0  # configs/device/gateway.yaml
    # per round: the application bytes (engine=sim has no wire counters) and one connection (FedAvg)
    nb_radio = UP * nb.tx_uj_per_byte / 1e6 + DOWN * nb.rx_uj_per_byte / 1e6 + nb.connect_mj / 1e3
    lte_radio = UP * lte.tx_uj_per_byte / 1e6 + DOWN * lte.rx_uj_per_byte / 1e6 + lte.connect_mj / 1e3
    assert table["nb_iot/gateway"]["radio [J/round]"] == f"{nb_radio:,.4g}"
    assert table["lte_m/gateway"]["radio [J/round]"] == f"{lte_radio:,.4g}"
    assert nb_radio > 10 * lte_radio  # NB-IoT: 74 µJ a byte sent, LTE-M 3.4
    # compute: 10 W x the gateway's compute seconds (gateway 1 on NB-IoT: 0.5 s, then 0.25 s)
    assert table["nb_iot/gateway"]["compute [J/round]"] == f"{gateway * 0.375:,.4g}"
    assert table["nb_iot/gateway"]["run, class [J]"] == f"{2 * nb_radio + gateway * 0.75:,.4g}"
    assert table["nb_iot/gateway"]["updates"] == "2" and table["nb_iot/gateway"]["bytes"] == "application"
    assert table["nb_iot/gateway"]["offline [s]"] == "0"  # no outage recorded: online all along
    assert "not a measurement" in report and "`configs/link/*.yaml`" in report
    # the same figures as the ServerApp writes to metrics.json
    assert energy_per_class(log.rows)["nb_iot/gateway"]["radio_j_per_round"] == pytest.approx(nb_radio)


def test_the_report_counts_each_class_offline_from_the_recorded_outages(sim_run):
    run_dir, _, log = sim_run
    span = log.rows[-1]["time"] - log.rows[0]["time"]
    (run_dir / "outages.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
        {"t": 0.0, "round": 1, "gateway": 1, "state": "down"},
        {"t": span / 4, "round": 1, "gateway": 1, "state": "up"},
        {"t": span / 2, "round": 2, "gateway": 1, "state": "down"}]))  # down until the end
    table = _energy_table(write_report(run_dir).read_text())
    assert table["nb_iot/gateway"]["offline [s]"] == f"{0.75 * span:,.4g}"
    assert table["nb_iot/gateway"]["online [s]"] == f"{span - 0.75 * span:,.4g}"
    assert table["lte_m/gateway"]["offline [s]"] == "0"


def test_metrics_json_carries_the_energy_per_class(sim_run):
    run_dir, cfg, log = sim_run
    model = torch.nn.Linear(3, 1)
    run = SimpleNamespace(out=run_dir, cfg=cfg, log=log, model=model, nodes=[11, 12], sums=None, resume=0,
                          settings=SimpleNamespace(run_uid="energy"),
                          task=SimpleNamespace(name="predictive_maintenance", primary_metric="rmse",
                                               higher_is_better=False))
    app._finish(run, ArrayRecord(model.state_dict()), {}, 2, [])
    final = json.loads((run_dir / "metrics.json").read_text())
    energy = final["energy_per_class"]
    assert energy == json.loads(json.dumps(energy_per_class(log.rows)))
    nb = energy["nb_iot/gateway"]
    assert nb["gateways"] == 1 and nb["gateway_rounds"] == 2 and nb["updates"] == 2 and nb["bytes"] == "application"
    assert nb["total_j"] == pytest.approx(2 * nb["total_j_per_round"]) == pytest.approx(nb["total_j_per_gateway"])
    assert {"rounds", "final_round", "privacy", "notes"} <= set(final)  # the keys it had before
