"""A gateway's own data: its description, the local store, the intake, and the task records built from them."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from iiotfl.clients import sources
from iiotfl.clients.sources import DataMismatch, Intake, SpecError, Store, StoreError, gateway_records, spec
from iiotfl.configs import compose
from iiotfl.tasks import get_task
from iiotfl.tasks.predictive_maintenance.generator import SENSORS, generate_plant
from iiotfl.tasks.quality_control.generator import generate_plant as qc_plant
from iiotfl.tasks.quality_control.loader import write_csv


@pytest.fixture(autouse=True)
def _plant_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("IIOTFL_PLANT_KEYS", str(tmp_path / "plant-keys"))


def _task(name: str, *overrides: str):
    cfg = compose([f"task={name}", *overrides])
    return get_task(cfg["task"], cfg["seed"])


def _write(path, raw) -> str:
    path.write_text(json.dumps(raw))
    return str(path)


def _mqtt(tmp_path, **extra) -> dict:
    return {"task": "predictive_maintenance",
            "source": {"kind": "mqtt", "broker": "127.0.0.1:1883", "topics": ["plant/#"]},
            "signals": {"unit": "machine", "cycle": "count", **{s: f"p_{s}" for s in SENSORS}},
            "store": {"path": str(tmp_path / "store.sqlite")}, **extra}


# -- the description ----------------------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    ({"source": {"kind": "modbus"}}, ["source.kind", "'modbus'"]),
    ({"source": {"kind": "mqtt", "broker": "nohost"}}, ["source.broker", "host:port"]),
    ({"source": {"kind": "mqtt", "broker": "h:1883", "topics": []}}, ["source.topics"]),
    ({"source": {"kind": "mqtt", "broker": "h:1883", "topics": ["t"], "format": "xml"}}, ["source.format", "xml"]),
    ({"source": {"kind": "opcua", "endpoint": "opc.tcp://h:4840"}}, ["row_key", "cycle"]),
    ({"source": {"kind": "opcua", "endpoint": "http://h"}}, ["source.endpoint"]),
    ({"source": {"kind": "csv", "path": "x", "sep": ";;"}}, ["source.sep"]),
    ({"source": {"kind": "csv", "path": "x", "baud": 9600}}, ["unknown key", "baud"]),
    ({"task": "weather"}, ["task:", "weather"]),
    ({"signals": {"unit": {"name": "m", "fn": "tan"}}}, ["signals.unit.fn", "tan"]),
    ({"signals": {"unit": {"name": "m", "scale": "x"}}}, ["signals.unit.scale"]),
    ({"row_key": "cycel"}, ["row_key", "cycel"]),
    ({"store": {"max_mb": -1, "path": "s"}}, ["max_mb"]),
    ({"colour": "red"}, ["unknown key", "colour"]),
])
def test_a_bad_description_is_one_line_naming_the_key(tmp_path, change, words):
    path = _write(tmp_path / "gateway.yaml", {**_mqtt(tmp_path), **change})
    with pytest.raises(SpecError) as err:
        spec.load(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(tmp_path / "gateway.yaml"))
    for word in words:
        assert word in text


def test_unreadable_yaml_and_missing_file(tmp_path):
    (tmp_path / "g.yaml").write_text("task: [unclosed\n")
    with pytest.raises(SpecError, match=r"not readable YAML \(line"):
        spec.load(tmp_path / "g.yaml")
    with pytest.raises(SpecError, match="not found"):
        spec.load(tmp_path / "none.yaml")


def test_signals_convert_units_and_angles():
    t = spec.Signal("T24", "temp_c", scale=1.8, offset=491.67)
    assert t.convert(100) == pytest.approx(671.67) and t.convert("M-1") == "M-1"
    assert spec.Signal("d_sin", "dir", fn="sin").convert(90) == pytest.approx(1.0)
    assert spec.Signal("d_cos", "dir", fn="cos").convert(180) == pytest.approx(-1.0)


def test_mismatch_with_the_runs_task_is_one_line(tmp_path):
    s = spec.load(_write(tmp_path / "g.yaml", _mqtt(tmp_path)))
    assert s.mismatch("predictive_maintenance", ["unit", "cycle", *SENSORS]) is None
    why = s.mismatch("quality_control", ["type"])
    assert "offers task 'predictive_maintenance'" in why and "task=predictive_maintenance" in why
    why = s.mismatch("predictive_maintenance", ["unit", "cycle", "T24", "vibration_rms"])
    assert "maps no signal to ['vibration_rms']" in why and "task.features" in why


# -- the store ----------------------------------------------------------------------------------------
def test_the_store_is_durable_and_refuses_another_tasks(tmp_path):
    store = Store(tmp_path / "s.sqlite", "predictive_maintenance")
    store.append([(1.0, 1.0, {"unit": "a", "cycle": 1}), (2.0, 2.0, {"unit": "a", "cycle": 2})])
    store.close()
    again = Store(tmp_path / "s.sqlite", "predictive_maintenance")  # a restarted gateway
    assert [r for _, _, r in again.records()] == [{"unit": "a", "cycle": 1}, {"unit": "a", "cycle": 2}]
    again.close()
    with pytest.raises(StoreError, match="holds predictive_maintenance records"):
        Store(tmp_path / "s.sqlite", "quality_control")
    (tmp_path / "junk.sqlite").write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match="cannot be opened"):
        Store(tmp_path / "junk.sqlite", "quality_control")
    assert (tmp_path / "junk.sqlite").stat().st_size == 4096  # nothing overwritten


def test_the_store_drops_the_oldest_first_by_age_and_by_size(tmp_path):
    now = [1000.0]
    aged = Store(tmp_path / "a.sqlite", "predictive_maintenance", max_age_days=1.0, clock=lambda: now[0])
    aged.append([(now[0] - 2 * 86400, 0.0, {"cycle": 1}), (now[0] - 10, 0.0, {"cycle": 2})])
    now[0] += 5
    aged.trim()
    assert [r["cycle"] for _, _, r in aged.records()] == [2] and aged.dropped == 1

    small = Store(tmp_path / "b.sqlite", "predictive_maintenance", max_mb=0.25)
    payload = {f"s{i}": 1.0 + i for i in range(20)}
    for batch in range(40):
        small.append([(float(batch * 100 + i), 0.0, {"n": batch * 100 + i, **payload}) for i in range(100)])
        small.trim()
    kept = [r["n"] for _, _, r in small.records()]
    assert small._used_bytes() <= 0.25 * 2**20
    assert kept == list(range(kept[0], 4000)) and kept[0] > 0  # the newest kept, the oldest gone


# -- the intake --------------------------------------------------------------------------------------
def _intake(tmp_path, clock, said, **extra):
    s = spec.parse({**_mqtt(tmp_path), **extra}, tmp_path / "g.yaml")
    return Intake(s, sources.open_store(s), clock=clock, say=said.append)


def test_records_are_assembled_on_the_row_key_and_mapped(tmp_path):
    said: list[str] = []
    raw = _mqtt(tmp_path, row_key="cycle")
    raw["source"]["format"] = "value"
    raw["signals"]["T24"] = {"name": "p_T24", "scale": 2.0}
    s = spec.parse(raw, tmp_path / "g.yaml")
    intake = Intake(s, sources.open_store(s), say=said.append)
    intake.values({"machine": "M-7", "p_T24": 10.0})
    intake.values({"count": 1})  # the cycle counter is written last: one record
    intake.values({"p_T24": 11.0, "unmapped": 3})
    intake.values({"count": 1})  # unchanged key: no record
    intake.values({"count": 2})
    intake.flush()
    records = [r for _, _, r in intake.store.records()]
    assert records == [{"unit": "M-7", "T24": 20.0, "cycle": 1.0}, {"unit": "M-7", "T24": 22.0, "cycle": 2.0}]


def test_skewed_times_get_the_arrival_time_and_are_counted(tmp_path):
    said: list[str] = []
    now = 1_700_000_000.0
    intake = _intake(tmp_path, lambda: now, said, timestamp="ts", max_skew_s=60)
    intake.values({"machine": "a", "count": 1, "ts": now - 30})               # within the bound: kept
    intake.values({"machine": "a", "count": 2, "ts": (now - 3600) * 1000})    # ms, an hour behind
    intake.values({"machine": "a", "count": 3, "ts": "2031-01-01T00:00:00"})  # years ahead
    intake.flush()
    times = [t for _, t, _ in intake.store.records()]
    assert times == [now - 30, now, now] and intake.skewed == 2
    assert sum("off this gateway's clock" in x for x in said) == 1


def test_malformed_is_logged_once_per_kind_and_stale_signals_are_flagged(tmp_path):
    said: list[str] = []
    now = [100.0]
    intake = _intake(tmp_path, lambda: now[0], said, stale_after_s=5)
    for _ in range(3):
        intake.malformed("payload (not JSON)", "b'\\xff'")
    intake.malformed("payload (not an object)", "[1]")
    intake.values({"machine": "a", "count": 1, **{f"p_{s}": 1.0 for s in SENSORS}})
    now[0] += 3
    intake.values({"machine": "a", "count": 2, **{f"p_{s}": 1.0 for s in SENSORS if s != "T24"}})
    now[0] += 4  # T24 last updated 7 s ago
    status = intake.write_status()
    assert status["malformed"] == {"payload (not JSON)": 3, "payload (not an object)": 1}
    assert sum("malformed payload (not JSON)" in x for x in said) == 1
    assert status["stale"] == ["T24"] and status["stored"] == 2
    assert json.loads(intake.status_path().read_text())["stale"] == ["T24"]
    assert sum("'p_T24' (T24) has not updated" in x for x in said) == 1
    intake.values({"p_T24": 2.0})
    assert intake.write_status()["stale"] == [] and any("T24 updates again" in x for x in said)


# -- from the gateway's data to the task's records -------------------------------------------------
def test_a_plants_own_csv_export_with_its_own_names_and_separator(tmp_path):
    data = generate_plant(0, 0, n_units=3)
    (tmp_path / "export").mkdir()
    with (tmp_path / "export" / "day-1.csv").open("w") as fh:
        fh.write(";".join(["Maschine", "Zeit", *[f"Sensor {n}" for n in data.sensor_names]]) + "\n")
        for i in range(len(data)):
            fh.write(";".join([f"M-{data.unit[i]}", str(data.cycle[i]), *[f"{v:.3f}" for v in data.sensors[i]]]) + "\n")
    s = spec.from_flags("predictive_maintenance", str(tmp_path / "export"), ";",
                        ["unit=Maschine", "cycle=Zeit", *[f"{n}=Sensor {n}" for n in data.sensor_names]],
                        keep=tmp_path / "state" / "data.json")
    task = _task("predictive_maintenance")
    got = gateway_records(task, {"data-spec": str(s.path)}, 0)
    assert len(got) == len(data) and got.n_units == 3 and list(got.sensor_names) == task.features
    col = list(data.sensor_names).index("T24")
    assert np.allclose(np.sort(got.sensors[:, 0]), np.sort(np.round(data.sensors[:, col], 3)))
    # a broken value names its file, row and column
    text = (tmp_path / "export" / "day-1.csv").read_text().splitlines()
    (tmp_path / "export" / "day-2.csv").write_text(text[0] + "\n" + text[1].replace("M-", "M-9", 1).replace(
        text[1].split(";")[2], "kaputt") + "\n")
    with pytest.raises(ValueError, match=r"day-2.csv: row 2, column 'T2"):
        gateway_records(task, {"data-spec": str(s.path)}, 0)


def test_every_task_can_be_fed_from_a_table(tmp_path):
    qc = qc_plant(0, 1, 400)
    write_csv(qc, tmp_path / "ai4i.csv")
    s = spec.from_flags("quality_control", str(tmp_path / "ai4i.csv"), keep=tmp_path / "qc.json")
    got = gateway_records(_task("quality_control"), {"data-spec": str(s.path)}, 1)
    assert len(got) == 400 and np.array_equal(got.labels, qc.labels)

    t0 = 1_700_000_000
    hours = 24 * 30
    rng = np.random.default_rng(0)
    temp = 10 + 5 * np.sin(np.arange(hours) / 24 * 2 * np.pi)
    rows = ["time,load_kw,temp_c,normal_temp,alarm"] + [
        f"{t0 + 3600 * h},{50 + temp[h] + rng.normal():.3f},{temp[h]:.2f},{temp[h]:.2f},{int(h in (600, 601))}"
        for h in range(hours)]
    (tmp_path / "meter.csv").write_text("\n".join(rows) + "\n")
    raw = {"task": "energy_anomaly", "source": {"kind": "csv", "path": "meter.csv"},
           "signals": {"timestamp": "time", "target": "load_kw", "temp": "temp_c", "temp_typical": "normal_temp",
                       "label": "alarm"}}
    path = _write(tmp_path / "meter.yaml", raw)
    task = _task("energy_anomaly", "task.data.source=smart_meter")
    series = gateway_records(task, {"data-spec": path}, 0)
    assert len(series) == hours and list(series.feature_names) == task.features
    assert series.label.sum() == 2 and series.period.sum() > 0.15 * hours  # the last part is held out
    hour = (series.step % 24) / 24 * 2 * np.pi  # time features from the timestamp
    assert np.allclose(series.inputs[:, task.features.index("hour_sin")], np.sin(hour))
    train, val = task.gateway_data(0, None, series)
    assert len(train) < len(val) and (train.label == 0).all()


def test_the_store_feeds_training_keeping_a_repeated_records_last_version(tmp_path):
    s = spec.parse(_mqtt(tmp_path), tmp_path / "g.yaml")
    data = generate_plant(0, 0, n_units=2)
    store = sources.open_store(s)
    rows = [(time.time(), time.time(), {"unit": str(data.unit[i]), "cycle": int(data.cycle[i]),
                                        **{n: float(data.sensors[i, j]) for j, n in enumerate(data.sensor_names)}})
            for i in range(len(data))]
    store.append(rows + rows[:5] + [(0.0, 0.0, {"unit": "1"})])  # redelivered + incomplete
    store.close()
    (tmp_path / "g.yaml").write_text(json.dumps(_mqtt(tmp_path)))
    got = gateway_records(_task("predictive_maintenance"), {"data-spec": str(tmp_path / "g.yaml")}, 0)
    assert len(got) == len(data) and got.n_units == 2


def test_the_runs_task_against_the_gateways_data_is_one_line(tmp_path):
    path = _write(tmp_path / "g.yaml", _mqtt(tmp_path))
    with pytest.raises(DataMismatch) as err:
        gateway_records(_task("quality_control"), {"data-spec": path}, 0)
    assert "offers task 'predictive_maintenance', the run's task is 'quality_control'" in str(err.value)
    with pytest.raises(DataMismatch, match=r"maps no signal to \['W99'\]"):
        gateway_records(_task("predictive_maintenance", "task.features=[T24,W99]"), {"data-spec": path}, 0)
    with pytest.raises(DataMismatch, match="no complete records yet"):
        gateway_records(_task("predictive_maintenance"), {"data-spec": path}, 0)


def test_a_live_plants_units_count_once_they_have_failed(tmp_path):
    s = spec.parse({**_mqtt(tmp_path), "signals": {**_mqtt(tmp_path)["signals"], "failed": "failure"}},
                   tmp_path / "g.yaml")
    (tmp_path / "g.yaml").write_text(json.dumps({**_mqtt(tmp_path), "signals": {**_mqtt(tmp_path)["signals"],
                                                                                "failed": "failure"}}))
    data = generate_plant(0, 0, n_units=3)
    store = sources.open_store(s)
    ends = {u: int(data.cycle[data.unit == u].max()) for u in (1, 2)}  # units 1 and 2 failed; 3 still runs
    store.append([(0.0, 0.0, {"unit": str(data.unit[i]), "cycle": int(data.cycle[i]),
                              "failed": int(ends.get(int(data.unit[i])) == int(data.cycle[i])),
                              **{n: float(data.sensors[i, j]) for j, n in enumerate(data.sensor_names)}})
                  for i in range(len(data))])
    store.close()
    got = gateway_records(_task("predictive_maintenance"), {"data-spec": str(tmp_path / "g.yaml")}, 0)
    assert got.n_units == 2 and len(got) == sum((data.unit == u).sum() for u in (1, 2))
    assert sorted(got.rul[got.cycle == 1]) == sorted(e - 1 for e in ends.values())  # counted to the failure


def test_iiotfl_gateway_check_names_the_problem_in_one_line(tmp_path, capsys):
    from iiotfl.clients import gateway

    def check(*args: str) -> tuple[int, list[str]]:
        code = gateway.main(["--superlink", "127.0.0.1:1", "--insecure", "--check", "--state-dir",
                             str(tmp_path / "state"), *args])
        return code, [x for x in capsys.readouterr().err.splitlines() if x]

    write_csv(qc_plant(0, 0, 50), tmp_path / "ai4i.csv")
    code, said = check("--data", str(tmp_path / "ai4i.csv"), "--task", "quality_control")
    assert code == 0 and "reads 50 records" in said[-1]
    code, said = check("--data", str(tmp_path / "ai4i.csv"))  # the default schema is predictive maintenance
    assert code == 2 and said[-1].startswith("error: ") and "no column for unit" in said[-1]
    code, said = check("--sep", ";")
    assert code == 2 and said == ["error: --sep and --column describe a CSV export: give it with --data DIR"]
    qc = _write(tmp_path / "qc.yaml", {"task": "quality_control", "source": {"kind": "csv", "path": "ai4i.csv"},
                                       "signals": {"type": "Type", "air": "Air temperature [K]"}})
    code, said = check("--source", qc)
    assert code == 2 and "maps no signal to ['process', 'speed', 'torque', 'wear']" in said[-1] and len(said) == 1
    code, said = check("--source", qc, "--task", "predictive_maintenance")
    assert code == 2 and "describes quality_control data" in said[-1]
    code, said = check("--source", qc, "--data", str(tmp_path))
    assert code == 2 and "give one" in said[-1]
    live = _write(tmp_path / "live.yaml", {**_mqtt(tmp_path), "source": {
        "kind": "mqtt", "broker": "127.0.0.1:1", "topics": ["t"], "tls": {"ca": "missing-ca.pem"}}})
    code, said = check("--source", live)
    assert code == 2 and "missing-ca.pem" in said[-1]
