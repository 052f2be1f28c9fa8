"""The OPC UA source (clients/sources/opcua.py) against a simulated machine on a real asyncua
server on loopback (tests/opcua_machine.py): subscribe and poll, browse paths and node ids, an
unreachable, late and restarted server, a signal that stops, a node that does not exist, and a
server that requires Basic256Sha256 SignAndEncrypt with the gateway's certificate."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml
from asyncua import ua

from iiotfl.clients.sources import collect, gateway_records, open_store
from iiotfl.clients.sources import opcua as source
from iiotfl.clients.sources.spec import DataSpec, SpecError, load
from iiotfl.configs import compose
from iiotfl.tasks import get_task
from iiotfl.tasks.predictive_maintenance.generator import SENSORS
from tests.opcua_machine import (
    COLUMNS,
    PLANT_NAMES,
    Machine,
    browse_path,
    free_port,
    make_certificate,
    node_id,
    plant_rows,
)

pytestmark = pytest.mark.timeout(60)


# -- helpers ------------------------------------------------------------------------------------
def describe(tmp_path: Path, endpoint: str, signals: dict[str, Any], mode: str = "subscribe",
             **extra: Any) -> tuple[Path, DataSpec]:
    source_keys = {k: extra.pop(k) for k in list(extra) if k in {"security", "username", "password_file",
                                                                   "timeout_s"}}
    raw = {"task": "predictive_maintenance", "row_key": "cycle",
           "source": {"kind": "opcua", "endpoint": endpoint, "mode": mode, "interval_s": 0.05, "timeout_s": 2,
                      **source_keys},
           "signals": signals, "store": {"path": "store.sqlite", "flush_s": 0.05}, **extra}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, load(path)


def status(spec: DataSpec) -> dict[str, Any]:
    assert spec.store_path is not None
    path = spec.store_path.with_name(spec.store_path.stem + ".status.json")
    return json.loads(path.read_text()) if path.exists() else {}


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def stored(spec: DataSpec) -> list[dict[str, Any]]:
    store = open_store(spec)
    try:
        return [record for _, _, record in store.records()]
    finally:
        store.close()


def assert_as_published(records: list[dict[str, Any]], published: list[dict[str, float]],
                        columns: dict[str, str] = COLUMNS) -> None:
    """Every stored record is the machine's record of its (unit, cycle), every value exactly."""
    by_key = {(p["Unit"], p["Cycle"]): p for p in published}
    assert records
    for record in records:
        row = by_key.get((record["unit"], record["cycle"]))
        assert row is not None, f"a record the machine never published: {record}"
        assert {c: record[c] for c in columns} == {c: float(row[n]) for c, n in columns.items()}


@pytest.fixture
def machines():
    made: list[Machine] = []

    def make(**kwargs: Any) -> Machine:
        machine = Machine(**kwargs)
        made.append(machine)
        return machine.start()

    yield make
    for machine in made:
        machine.stop()


@pytest.fixture
def collectors():
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(spec: DataSpec, lines: list[str]) -> tuple[threading.Event, threading.Thread]:
        stop = threading.Event()
        thread = collect(spec, stop, say=lines.append)
        running.append((stop, thread))
        return stop, thread

    yield start
    for stop, thread in running:
        stop.set()
    for stop, thread in running:
        thread.join(10)
        assert not thread.is_alive(), "a collector did not end after stop"


def connected(spec: DataSpec) -> bool:
    return bool(status(spec).get("connected"))


# -- the live tests -------------------------------------------------------------------------------
def test_subscribe_assembles_the_machines_cycles_exactly(tmp_path, monkeypatch, machines, collectors):
    monkeypatch.setenv("IIOTFL_PLANT_KEYS", str(tmp_path / "plant-keys"))
    machine = machines(records=plant_rows(limit=120), period_s=0.01)  # 5 cycles per publishing interval
    signals = {c: browse_path(n) for c, n in COLUMNS.items()}
    signals["unit"], signals["T50"] = browse_path("Unit", indexed=False), browse_path("Temp_LPT_out", indexed=False)
    path, spec = describe(tmp_path, machine.endpoint, signals)
    lines: list[str] = []
    stop, thread = collectors(spec, lines)
    wait_for(lambda: connected(spec), 10, "the collector connects")
    machine.begin()
    assert machine.done.wait(15)
    records = wait_for(lambda: (r := stored(spec)) and len(r) >= len(machine.published) and r, 10,
                       "every published cycle is stored")

    assert len(records) == len(machine.published) == 120  # the first from the initial values, no cycle lost
    assert_as_published(records, machine.published)
    assert [(r["unit"], r["cycle"]) for r in records] == [(p["Unit"], p["Cycle"]) for p in machine.published]
    st = wait_for(lambda: (s := status(spec)) and s["recorded"] == 120 and s, 5, "the status counts them")
    assert st["connected"] is True and st["malformed"] == {} and st["stored"] == 120 and st["stale"] == []
    assert any("connected" in line and machine.endpoint in line for line in lines)
    began = time.monotonic()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - began < 2.5  # a connected source ends promptly too

    task = get_task(compose(["task=predictive_maintenance"])["task"], 0)
    data = gateway_records(task, {"data-spec": str(path)}, 0)
    assert len(data) == 120 and data.sensors.shape[1] == len(SENSORS)
    j = list(data.sensor_names).index("T24")
    assert np.array_equal(np.sort(data.sensors[:, j]), np.sort([p["Temp_LPC_out"] for p in machine.published]))


def test_poll_with_node_ids(tmp_path, machines, collectors):
    machine = machines(records=plant_rows(limit=80), period_s=0.02)
    signals = {c: node_id(n) for c, n in COLUMNS.items()}
    signals["cycle"] = "nsu=urn:iiotfl:test:machine;s=Machine1.Cycle"  # the namespace by its URI
    path, spec = describe(tmp_path, machine.endpoint, signals, mode="poll")
    lines: list[str] = []
    collectors(spec, lines)
    wait_for(lambda: connected(spec), 10, "the collector connects")
    machine.begin()
    assert machine.done.wait(10)
    records = wait_for(lambda: (r := stored(spec)) and r[-1]["cycle"] == machine.published[-1]["Cycle"] and r, 5,
                       "the last cycle is read")
    assert len(records) >= 15  # a read every 50 ms of a machine at 20 ms: about every other cycle
    assert_as_published(records, machine.published)
    st = wait_for(lambda: (s := status(spec)) and s["recorded"] >= len(records) and s, 5, "the status counts them")
    assert st["received"] > len(records) and st["malformed"] == {} and st["stale"] == []


def test_unreachable_then_late_then_restarted_server(tmp_path, monkeypatch, machines, collectors):
    monkeypatch.setenv("IIOTFL_SOURCE_RETRY_MAX_S", "1")
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}/iiotfl/machine"
    path, spec = describe(tmp_path, endpoint, {c: browse_path(n) for c, n in COLUMNS.items()})

    lines: list[str] = []
    stop, thread = collectors(spec, lines)
    wait_for(lambda: sum("not connected" in line for line in lines) >= 2, 10, "two failed tries")
    st = status(spec)
    assert st["connected"] is False and endpoint in st["detail"] and "retrying in 1 s" in st["detail"]
    assert "connection refused" in st["detail"]
    began = time.monotonic()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - began < 2.5

    lines.clear()
    collectors(spec, lines)
    wait_for(lambda: any("not connected" in line for line in lines), 10, "the second collector fails first")
    rows = plant_rows()
    first = machines(port=port, records=rows[:400], period_s=0.01)  # the server comes up late
    wait_for(lambda: connected(spec), 10, "the collector connects by itself")
    first.begin()
    wait_for(lambda: len(stored(spec)) >= 20, 10, "records arrive")
    first.stop()  # the server goes away in the middle of the run
    wait_for(lambda: not connected(spec), 10, "the lost connection is noticed")
    assert endpoint in status(spec)["detail"]
    second = machines(port=port, records=rows[500:600], period_s=0.01)
    wait_for(lambda: connected(spec), 10, "the collector reconnects by itself")
    second.begin()
    assert second.done.wait(10)
    records = wait_for(lambda: (r := stored(spec)) and r[-1]["cycle"] == rows[599]["Cycle"] and r, 10,
                       "the restarted server's records arrive")
    assert_as_published(records, first.published + second.published)
    assert {(r["unit"], r["cycle"]) for r in records} >= {(p["Unit"], p["Cycle"]) for p in second.published}


def test_a_signal_that_stops_updating_is_flagged_stale_once(tmp_path, machines, collectors):
    machine = machines(records=plant_rows(limit=900), period_s=0.01)
    path, spec = describe(tmp_path, machine.endpoint, {c: browse_path(n) for c, n in COLUMNS.items()},
                          stale_after_s=1)
    lines: list[str] = []
    collectors(spec, lines)
    wait_for(lambda: connected(spec), 10, "the collector connects")
    machine.begin()
    wait_for(lambda: len(stored(spec)) >= 20, 10, "records arrive")
    assert status(spec).get("stale", []) == []
    seen = len(lines)
    machine.frozen.add(PLANT_NAMES["T24"])  # the machine stops writing one sensor
    wait_for(lambda: status(spec).get("stale") == ["T24"], 8, "the status lists T24 as stale")
    time.sleep(2.3)  # one more status write
    st = status(spec)
    assert st["stale"] == ["T24"] and st["last_update_s"]["T30"] < 1.0  # the others still flow
    said = [line for line in lines[seen:] if "has not updated" in line]
    assert len(said) == 1 and "'2:Machine1/2:Temp_LPC_out' (T24)" in said[0]
    assert not machine.done.is_set()  # it was publishing all along


def test_a_node_that_does_not_exist_is_named_and_the_others_flow(tmp_path, machines, collectors):
    machine = machines(records=plant_rows(limit=400), period_s=0.01)
    signals = {c: browse_path(n) for c, n in COLUMNS.items()}
    signals["T24"] = "2:Machine1/2:Temp_LPC_Out"  # a typing error
    signals["W31"] = "2:Machine1/2:No_such_sensor"
    signals["T30"] = "ns=2;s=Machine1.Nope"
    signals["T50"] = "ns=2;s=Machine1"  # an object, not a variable
    path, spec = describe(tmp_path, machine.endpoint, signals, stale_after_s=1)
    lines: list[str] = []
    collectors(spec, lines)
    wait_for(lambda: connected(spec), 10, "the collector connects")
    machine.begin()
    wait_for(lambda: status(spec).get("stale") == ["T24", "T30", "T50", "W31"], 6, "the missing signals show as stale")
    assert not machine.done.is_set()  # while the others flow
    missing = {line.partition("(signals.")[2][:3]: line for line in lines if "not found" in line}
    assert len(missing) == 4 == sum("not found" in line for line in lines), lines  # each said once
    assert "'2:Machine1/2:Temp_LPC_Out' (signals.T24)" in missing["T24"] and str(path) in missing["T24"]
    assert "no '2:Temp_LPC_Out' under 2:Machine1 (did you mean 2:Temp_LPC_out?)" in missing["T24"]
    assert "no '2:No_such_sensor' under 2:Machine1 (it has 2:Bleed_enthalpy, 2:Bypass_ratio, " in missing["W31"]
    assert "'ns=2;s=Machine1.Nope' (signals.T30)" in missing["T30"] and "BadNodeIdUnknown" in missing["T30"]
    assert "'ns=2;s=Machine1' (signals.T50)" in missing["T50"] and "an Object node, not a variable" in missing["T50"]
    assert machine.done.wait(10)
    records = wait_for(lambda: (r := stored(spec)) and len(r) >= 400 and r, 10, "the other signals' records")
    others = {c: n for c, n in COLUMNS.items() if c not in ("T24", "T30", "T50", "W31")}
    assert_as_published(records, machine.published, others)
    assert all(not {"T24", "T30", "T50", "W31"} & set(r) for r in records)


def test_security_basic256sha256_sign_and_encrypt(tmp_path, machines, collectors):
    pki = tmp_path / "pki"
    cert, _ = make_certificate(pki, "gateway", "urn:iiotfl:test:gateway")
    make_certificate(pki, "stranger", "urn:iiotfl:test:stranger")
    machine = machines(records=plant_rows(limit=40), period_s=0.01, security={"trust": [cert]})
    security = {"policy": "Basic256Sha256", "mode": "SignAndEncrypt", "certificate": "pki/gateway-cert.pem",
                "private_key": "pki/gateway-key.pem"}
    path, spec = describe(tmp_path, machine.endpoint, {c: browse_path(n) for c, n in COLUMNS.items()},
                          security=security, timeout_s=5)
    source.check(spec)
    lines: list[str] = []
    collectors(spec, lines)
    wait_for(lambda: connected(spec), 20, "the gateway with the trusted certificate connects")
    machine.begin()
    assert machine.done.wait(10)
    records = wait_for(lambda: (r := stored(spec)) and len(r) >= 40 and r, 10, "records arrive encrypted")
    assert_as_published(records, machine.published)

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    path2, spec2 = describe(stranger, machine.endpoint, {c: browse_path(n) for c, n in COLUMNS.items()},
                            security={**security, "certificate": "../pki/stranger-cert.pem",
                                      "private_key": "../pki/stranger-key.pem"}, timeout_s=5)
    refused: list[str] = []
    collectors(spec2, refused)
    wait_for(lambda: any("not connected" in line for line in refused), 20, "an untrusted certificate is refused")
    assert not connected(spec2) and "Bad" in status(spec2)["detail"]

    (pki / "gateway-cert.pem").unlink()
    with pytest.raises(SpecError) as err:
        source.check(spec)
    assert str(err.value).startswith(f"{path}: source.security.certificate: ")
    assert str(pki / "gateway-cert.pem") in str(err.value) and "not found" in str(err.value)


def test_a_failing_store_ends_the_source_with_its_error(tmp_path, machines):
    machine = machines(records=plant_rows(limit=50), period_s=0.01)
    _, spec = describe(tmp_path, machine.endpoint, {c: browse_path(n) for c, n in COLUMNS.items()})

    class Full(_Intake):
        def values(self, values: dict[str, Any], ts: Any = None) -> None:
            raise OSError(28, "No space left on device")

    intake, stop, ended = Full(), threading.Event(), []

    def run() -> None:
        try:
            source.run(spec, intake, stop)  # type: ignore[arg-type]
        except OSError as err:
            ended.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: intake.up, 10, "the source connects")
        machine.begin()
        thread.join(10)
        assert not thread.is_alive() and ended and "No space left" in str(ended[0])
    finally:
        stop.set()
        thread.join(5)


# -- without a server ---------------------------------------------------------------------------------
def test_check_names_the_file_the_key_and_the_fix(tmp_path):
    pki = tmp_path / "pki"
    make_certificate(pki, "gateway", "urn:iiotfl:test:gateway")
    (tmp_path / "not-a-cert.pem").write_text("hello")
    (tmp_path / "pass").write_text("s3cret\n")
    good = {"certificate": "pki/gateway-cert.pem", "private_key": "pki/gateway-key.pem"}
    endpoint = "opc.tcp://127.0.0.1:4840"
    signals = {"unit": "Machine1/Unit", "cycle": "Machine1/Cycle"}

    def refused(**source_keys: Any) -> str:
        _, spec = describe(tmp_path, endpoint, signals, **source_keys)
        with pytest.raises(SpecError) as err:
            source.check(spec)
        text = str(err.value)
        assert text.startswith(f"{tmp_path / 'gateway.yaml'}: source.") and "\n" not in text
        return text

    _, spec = describe(tmp_path, endpoint, signals, security={**good, "policy": "Basic256Sha256"},
                       username="gw", password_file="pass")
    source.check(spec)
    assert "security.policy: 'Basic999'" in refused(security={**good, "policy": "Basic999"})
    assert "security.mode: 'Encrypt'" in refused(security={**good, "mode": "Encrypt"})
    assert "security.certificate: " in refused(security={**good, "certificate": "not-a-cert.pem"})
    assert "not an X.509 certificate" in refused(security={**good, "certificate": "not-a-cert.pem"})
    assert "security.private_key: " in refused(security={**good, "private_key": "pki/gateway-cert.pem"})
    assert "security.private_key: missing" in refused(security={"certificate": good["certificate"]})
    assert "unknown key(s) ['cert']" in refused(security={**good, "cert": "x"})
    assert "password_file: " in refused(username="gw", password_file="nope")
    assert "without source.username" in refused(password_file="pass")
    assert "timeout_s: 0" in refused(timeout_s=0)


class _Intake:
    """What the source calls, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], Any]] = []
        self.bad: list[tuple[str, str]] = []
        self.up = False

    def values(self, values: dict[str, Any], ts: Any = None) -> None:
        self.calls.append((dict(values), ts))

    def malformed(self, kind: str, detail: str) -> None:
        self.bad.append((kind, detail))

    def connected(self, up: bool, detail: str = "") -> None:
        self.up = up

    def say(self, line: str) -> None:
        pass


def test_one_notification_is_split_at_each_row_key_change_in_source_time_order(tmp_path):
    _, spec = describe(tmp_path, "opc.tcp://127.0.0.1:4840",
                       {"unit": "U", "cycle": "C", "T24": "A", "T30": "B", "T50": "S"})
    intake = _Intake()
    src = source._Source(spec, intake, threading.Event())
    src.handles = {1: "U", 2: "C", 3: "A", 4: "B", 5: "S"}
    t0 = datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)

    def item(handle: int, value: Any, dt_ms: float, status: int = 0) -> ua.MonitoredItemNotification:
        stamp = t0 + timedelta(milliseconds=dt_ms)
        return ua.MonitoredItemNotification(ClientHandle=handle, Value=ua.DataValue(
            ua.Variant(value), StatusCode=ua.StatusCode(status), SourceTimestamp=stamp, ServerTimestamp=stamp))

    # grouped per monitored item, as servers send them: cycle 7 ends, cycle 8 ends, cycle 9 begins
    src.changes([item(2, 7, 10), item(2, 8, 20),
                 item(3, 1.5, 10), item(3, 2.5, 20), item(3, 3.5, 30),
                 item(4, True, 10), item(4, False, 20),
                 item(1, 1, 10),
                 item(5, "run", 20), item(5, [1.0, 2.0], 30), item(5, 9.0, 30, status=0x80000000)])
    assert [c for c, _ in intake.calls] == [{"C": 7.0, "A": 1.5, "B": 1.0, "U": 1.0},
                                            {"C": 8.0, "A": 2.5, "B": 0.0, "S": "run"},
                                            {"A": 3.5}]
    assert [ts for _, ts in intake.calls] == [(t0 + timedelta(milliseconds=ms)).timestamp() for ms in (10, 20, 30)]
    assert [kind for kind, _ in intake.bad] == ["value type", "bad status"]
    assert "S: a list value" in intake.bad[0][1]
