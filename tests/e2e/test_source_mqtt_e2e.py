"""The MQTT source (clients/sources/mqtt.py) against a real mosquitto on 127.0.0.1: JSON, Sparkplug-like
and one-value payloads into the local store, a broker restart and a gateway restart with nothing lost
or doubled, malformed payloads, an unreachable broker, TLS with a password, and the static checks."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.brokers import Mosquitto, free_port, have_mosquitto

if not have_mosquitto():
    pytest.skip("the MQTT source tests need a mosquitto broker binary (Debian: apt-get install mosquitto)",
                allow_module_level=True)
mqtt = pytest.importorskip("paho.mqtt.client", reason="the MQTT source needs paho-mqtt (pip install paho-mqtt)")

from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from iiotfl.clients.sources import Store, check, collect, gateway_records, load  # noqa: E402
from iiotfl.clients.sources import mqtt as source  # noqa: E402
from iiotfl.clients.sources.spec import SpecError  # noqa: E402
from iiotfl.configs import compose  # noqa: E402
from iiotfl.tasks import get_task  # noqa: E402
from iiotfl.tasks.predictive_maintenance.generator import SENSORS, generate_plant  # noqa: E402

pytestmark = pytest.mark.timeout(120)

# the plant's names: nested under "sensors" (flattened to sensors.<name>), T24 published in degC
PLANT = {s: f"sensors.{s.lower()}_raw" for s in SENSORS} | {"T24": "sensors.t24_degC"}


# -- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.kill()


@pytest.fixture(autouse=True)
def _quick(monkeypatch, tmp_path):
    monkeypatch.setenv("IIOTFL_SOURCE_RETRY_MAX_S", "0.5")  # retries after 0.5 s, not 1, 2, 4, ...
    monkeypatch.setenv("IIOTFL_PLANT_KEYS", str(tmp_path / "plant-keys"))


def pm_task():
    return get_task(compose(["task=predictive_maintenance"])["task"], 0)


def plant_data():
    return generate_plant(5, 0, units_min=2, units_max=2, rul_cap=125)


def json_messages(data) -> list[tuple[str, bytes]]:
    out = []
    for i in range(len(data)):
        sensors = {PLANT[s].split(".", 1)[1]: float(v) for s, v in zip(data.sensor_names, data.sensors[i])}
        sensors["t24_degC"] = (sensors["t24_degC"] - 491.67) / 1.8
        unit = f"press-{int(data.unit[i])}"
        out.append((f"plant/line1/{unit}/cycle", json.dumps(
            {"machine": unit, "cycle_count": int(data.cycle[i]), "sensors": sensors, "site": "Werk 2"}).encode()))
    return out


def write_spec(tmp_path: Path, broker: str, *, fmt: str = "json", topics=("plant/line1/+/cycle",), signals=None,
               row_key: str | None = None, **source) -> Path:
    if signals is None:
        signals = {"unit": "machine", "cycle": "cycle_count", **{s: PLANT[s] for s in SENSORS}}
        signals["T24"] = {"name": PLANT["T24"], "scale": 1.8, "offset": 491.67}
    raw = {"task": "predictive_maintenance",
           "source": {"kind": "mqtt", "broker": broker, "topics": list(topics), "format": fmt, "qos": 1, **source},
           "signals": signals, "store": {"path": "store.sqlite"}}
    if row_key:
        raw["row_key"] = row_key
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def publish(address: str, messages, qos: int = 1, retain: bool = False) -> None:
    """Publish and wait until the broker has acknowledged each (QoS 1)."""
    host, port = address.split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"plant-{time.monotonic_ns()}")
    client.max_inflight_messages_set(200)
    client.connect(host, int(port))
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=qos, retain=retain) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.is_published(), "the broker did not acknowledge a publish"
    finally:
        client.disconnect()
        client.loop_stop()


class Collector:
    """``collect()`` in the background with its log captured."""

    def __init__(self, spec_path: Path) -> None:
        self.spec = load(spec_path)
        self.lines: list[str] = []
        self.stop_event = threading.Event()
        self.thread = collect(self.spec, self.stop_event, say=self.lines.append)

    def stop(self) -> float:
        t0 = time.monotonic()
        self.stop_event.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the MQTT source did not end after stop"
        return time.monotonic() - t0

    def count(self) -> int:
        store = Store(self.spec.store_path, "predictive_maintenance")
        try:
            return store.count()
        finally:
            store.close()

    def records(self):
        store = Store(self.spec.store_path, "predictive_maintenance")
        try:
            return store.records()
        finally:
            store.close()

    def status(self) -> dict:
        path = self.spec.store_path.with_name(self.spec.store_path.stem + ".status.json")
        return json.loads(path.read_text()) if path.exists() else {}

    def wait_count(self, n: int, timeout: float = 20.0) -> None:
        wait_until(lambda: self.count() >= n, timeout, lambda: f"store has {self.count()} of {n}; log {self.lines}")
        time.sleep(0.3)  # a few more would be a doubling: let them arrive before the caller counts
        assert self.count() == n, f"store has {self.count()} records, {n} were published; log {self.lines}"


def wait_until(cond, timeout: float = 10.0, why=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {why()}")


def connected_at(c: Collector) -> None:
    wait_until(lambda: any("mqtt source connected" in ln for ln in c.lines), 10, lambda: str(c.lines))


# -- 1. JSON records into the store and into the task --------------------------------------------
def test_json_records_reach_the_store_and_the_task(tmp_path, broker):
    data = plant_data()
    messages = json_messages(data)
    path = write_spec(tmp_path, broker.address)
    c = Collector(path)
    try:
        connected_at(c)
        publish(broker.address, messages)
        c.wait_count(len(messages))
    finally:
        took = c.stop()
    assert took < 2.0
    stored = [r for _, _, r in c.records()]
    assert [(r["unit"], r["cycle"]) for r in stored] == [(f"press-{int(u)}", float(k)) for u, k in
                                                          zip(data.unit, data.cycle)]
    assert np.allclose([r["T24"] for r in stored], data.sensors[:, SENSORS.index("T24")])  # degC -> scale/offset
    assert "site" not in stored[0], "an unmapped field went into the store"

    table = gateway_records(pm_task(), {"data-spec": str(path)}, 0)
    assert len(table) == len(messages) == len(data)
    assert table.n_units == 2
    got = np.array(sorted(map(tuple, np.round(table.sensors, 6))))
    want = np.array(sorted(map(tuple, np.round(data.sensors[:, [SENSORS.index(s) for s in table.sensor_names]], 6))))
    assert np.allclose(got, want, atol=1e-5)
    assert c.status()["connected"] is False and c.status()["recorded"] == len(messages)


# -- 2. broker restart and gateway restart: nothing lost, nothing doubled ------------------------
def test_broker_restart_and_gateway_restart_lose_and_double_nothing(tmp_path, broker):
    messages = json_messages(plant_data())
    n = len(messages)
    a, b, c_, d = messages[: n * 4 // 10], messages[n * 4 // 10: n * 7 // 10], messages[n * 7 // 10: n * 85 // 100], \
        messages[n * 85 // 100:]
    path = write_spec(tmp_path, broker.address)
    c = Collector(path)
    try:
        connected_at(c)
        publish(broker.address, a)
        c.wait_count(len(a))
        broker.stop()
        wait_until(lambda: any("not connected" in ln and broker.address in ln and "retrying in" in ln for ln in c.lines),
                   10, lambda: str(c.lines))
        broker.start()
        publish(broker.address, b)  # perhaps before the gateway is back: queued in its persistent session
        c.wait_count(len(a) + len(b))
        assert sum("mqtt source connected" in ln for ln in c.lines) == 2, c.lines
        assert not any("kept no session" in ln for ln in c.lines), c.lines
    finally:
        c.stop()
    before = c.records()
    publish(broker.address, c_)  # the gateway is down: the broker queues these for its session
    c2 = Collector(path)
    try:
        c2.wait_count(len(a) + len(b) + len(c_))
        publish(broker.address, d)
        c2.wait_count(n)
    finally:
        c2.stop()
    after = c2.records()
    assert after[: len(before)] == before, "records stored before the gateway restart changed"
    keys = [(r["unit"], r["cycle"]) for _, _, r in after]
    assert len(set(keys)) == len(keys) == n, "a record was lost or stored twice"
    assert keys == [(json.loads(p)["machine"], float(json.loads(p)["cycle_count"])) for _, p in messages]


def test_retained_message_is_not_stored_again_on_reconnect(tmp_path, broker):
    path = write_spec(tmp_path, broker.address)
    (topic, payload), *rest = json_messages(plant_data())[:3]
    publish(broker.address, [(topic, payload)], retain=True)  # the plant keeps its last record retained
    c = Collector(path)
    try:
        c.wait_count(1)  # a new session: the retained record is taken
    finally:
        c.stop()
    c2 = Collector(path)  # the same session: the broker re-sends the retained record on SUBSCRIBE
    try:
        connected_at(c2)
        publish(broker.address, rest)
        c2.wait_count(3)
    finally:
        c2.stop()
    assert [r["cycle"] for _, _, r in c2.records()] == [1.0, 2.0, 3.0]


# -- 3. malformed payloads -----------------------------------------------------------------------
def sparkplug(metrics, ts_ms=None, seq=0) -> bytes:
    body = {"timestamp": ts_ms if ts_ms is not None else int(time.time() * 1000), "metrics": metrics, "seq": seq}
    return json.dumps(body).encode()


def sparkplug_messages(data, rows) -> list[tuple[str, bytes]]:
    now = int(time.time() * 1000)
    out = []
    for j, i in enumerate(rows):
        metrics = [{"name": "machine", "value": f"press-{int(data.unit[i])}"},
                   {"name": "cycle_count", "value": int(data.cycle[i]), "timestamp": now}]
        metrics += [{"name": s, "value": float(v)} for s, v in zip(data.sensor_names, data.sensors[i])]
        out.append(("spBv1.0/plant/DDATA/gw7/press", sparkplug(metrics, now - (len(rows) - j) * 1000, j)))
    return out


SPARKPLUG_SIGNALS = {"unit": "machine", "cycle": "cycle_count", **{s: s for s in SENSORS}}


def test_malformed_payloads_are_counted_logged_once_and_survived(tmp_path, broker):
    data = plant_data()
    good = sparkplug_messages(data, range(6))
    bad = [(b"{not json", "payload (not JSON)"),
           (b"[1, 2, 3]", "payload (not a JSON object)"),
           (bytes(range(256))[::-1], "payload (not UTF-8)"),
           (sparkplug([{"value": 3.0}]), "sparkplug (metric without name)"),
           (json.dumps({"metrics": {"T24": 1}}).encode(), "sparkplug (metrics not a list)")]
    path = write_spec(tmp_path, broker.address, fmt="sparkplug", topics=["spBv1.0/plant/#"], signals=SPARKPLUG_SIGNALS)
    c = Collector(path)
    try:
        connected_at(c)
        topic = good[0][0]
        stream = [good[0], *[(topic, p) for p, _ in bad], good[1], good[2], *[(topic, p) for p, _ in bad], *good[3:]]
        publish(broker.address, stream)
        c.wait_count(len(good))
        assert c.thread.is_alive()
    finally:
        c.stop()
    assert c.status()["malformed"] == {kind: 2 for _, kind in bad}
    for _, kind in bad:
        assert sum(f"malformed {kind} " in ln for ln in c.lines) == 1, (kind, c.lines)
    assert not any("stopped" in ln for ln in c.lines), c.lines


# -- 4. the Sparkplug-like and the one-value formats ---------------------------------------------
def test_sparkplug_metrics_become_records_at_the_payload_time(tmp_path, broker):
    data = plant_data()
    messages = sparkplug_messages(data, range(20))
    path = write_spec(tmp_path, broker.address, fmt="sparkplug", topics=["spBv1.0/plant/+/gw7/#"],
                      signals=SPARKPLUG_SIGNALS)
    c = Collector(path)
    try:
        connected_at(c)
        publish(broker.address, messages)
        c.wait_count(len(messages))
    finally:
        c.stop()
    rows = c.records()
    assert [ts for _, ts, _ in rows] == [json.loads(p)["timestamp"] / 1000 for _, p in messages]
    assert [r["cycle"] for _, _, r in rows] == [float(k) for k in data.cycle[:20]]
    assert np.array_equal([[r[s] for s in SENSORS] for _, _, r in rows], data.sensors[:20])


def test_one_value_topics_make_a_record_per_cycle(tmp_path, broker):
    data = plant_data()
    base = "plant/line1/press-1"
    signals = {"unit": f"{base}/machine", "cycle": f"{base}/cycle", **{s: f"{base}/{s}" for s in SENSORS}}
    path = write_spec(tmp_path, broker.address, fmt="value", topics=[f"{base}/#"], signals=signals, row_key="cycle")
    cycles = 12
    messages = []
    for i in range(cycles):  # the machine writes its sensors, then the cycle counter
        messages.append((f"{base}/machine", b"press-1"))
        messages += [(f"{base}/{s}", repr(float(v)).encode()) for s, v in zip(SENSORS, data.sensors[i])]
        messages.append((f"{base}/cycle", str(int(data.cycle[i])).encode()))
    c = Collector(path)
    try:
        connected_at(c)
        publish(broker.address, messages)
        c.wait_count(cycles)
    finally:
        c.stop()
    rows = [r for _, _, r in c.records()]
    assert [r["cycle"] for r in rows] == [float(k) for k in data.cycle[:cycles]]
    assert {r["unit"] for r in rows} == {"press-1"}
    assert np.array_equal([[r[s] for s in SENSORS] for r in rows], data.sensors[:cycles])


# -- 5. an unreachable broker --------------------------------------------------------------------
def test_unreachable_broker_is_retried_reported_and_stop_ends_it(tmp_path, monkeypatch):
    monkeypatch.setenv("IIOTFL_SOURCE_RETRY_MAX_S", "1.5")
    address = f"127.0.0.1:{free_port()}"
    c = Collector(write_spec(tmp_path, address))
    try:
        wait_until(lambda: sum("not connected" in ln for ln in c.lines) >= 3, 10, lambda: str(c.lines))
        status = c.status()
        assert status["connected"] is False
        assert status["detail"].startswith(f"{address}: ") and "retrying in 1.5 s" in status["detail"], status
        assert "refused" in c.lines[0].lower(), c.lines
        assert [ln.rpartition("retrying in ")[2] for ln in c.lines[:3]] == ["1 s", "1.5 s", "1.5 s"], c.lines
    finally:
        took = c.stop()  # in the middle of a 1.5 s wait
    assert took < 1.0


# -- TLS and a password, against the real broker -------------------------------------------------
def _tls_files(directory: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.TraditionalOpenSSL,
                                                             serialization.NoEncryption()))


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="needs mosquitto_passwd (Debian package mosquitto)")
def test_tls_and_password(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    _tls_files(certs)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(certs / "users"), "gw7", "s3cret"], check=True,
                   capture_output=True)
    b = Mosquitto(tmp_path / "broker", extra=[f"cafile {certs / 'ca.pem'}", f"certfile {certs / 'server.pem'}",
                                              f"keyfile {certs / 'server.key'}", f"password_file {certs / 'users'}"])
    b.start()
    try:
        gw = tmp_path / "gw"
        gw.mkdir()
        (gw / "mqtt.pass").write_text("s3cret\n")
        (gw / "wrong.pass").write_text("guess\n")
        path = write_spec(gw, b.address, tls={"ca": "../certs/ca.pem"}, username="gw7", password_file="wrong.pass")
        c = Collector(path)
        try:
            wait_until(lambda: any("not connected" in ln for ln in c.lines), 10, lambda: str(c.lines))
        finally:
            c.stop()
        assert "refused the connection: Not authorized" in c.lines[0], c.lines
        path = write_spec(gw, b.address, tls={"insecure": False}, username="gw7", password_file="mqtt.pass")
        c = Collector(path)  # TLS against the system's CAs, which did not sign this broker's certificate
        try:
            wait_until(lambda: any("not connected" in ln for ln in c.lines), 10, lambda: str(c.lines))
        finally:
            c.stop()
        assert f"{b.address}: TLS: the broker's certificate was not accepted (self-signed" in c.lines[0], c.lines
        path = write_spec(gw, b.address, tls={"ca": "../certs/ca.pem"}, username="gw7", password_file="mqtt.pass")
        messages = json_messages(plant_data())[:5]
        c = Collector(path)
        try:
            connected_at(c)
            # the plant publishes over TLS too
            host, port = b.address.split(":")
            pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plant-tls")
            pub.tls_set(ca_certs=str(certs / "ca.pem"))
            pub.username_pw_set("gw7", "s3cret")
            pub.connect(host, int(port))
            pub.loop_start()
            infos = [pub.publish(t, p, qos=1) for t, p in messages]
            for info in infos:
                info.wait_for_publish(timeout=10)
            pub.disconnect()
            pub.loop_stop()
            c.wait_count(len(messages))
        finally:
            c.stop()
    finally:
        b.kill()


# -- 6. static checks ----------------------------------------------------------------------------
def test_check_names_a_missing_tls_file(tmp_path):
    spec = load(write_spec(tmp_path, "127.0.0.1:8883", tls={"ca": "certs/plant-ca.pem"}))
    with pytest.raises(SpecError) as err:
        check(spec, pm_task())  # the package's check, as `iiotfl gateway --check` calls it
    text = str(err.value)
    assert str(tmp_path / "gateway.yaml") in text and "source.tls.ca" in text
    assert str(tmp_path / "certs" / "plant-ca.pem") in text and "\n" not in text
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "plant-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    source.check(spec)  # present: passes


@pytest.mark.parametrize("source_keys, fragment", [
    ({"username": "gw", "password_file": "nope.pass"}, "source.password_file: "),
    ({"password_file": "gw.pass"}, "needs source.username"),
    ({"tls": {"ca": None, "certificate": "gw.pem"}}, "source.tls.certificate: "),
    ({"tls": {"private_key": "gw.key"}}, "given without tls.certificate"),
    ({"tls": {"cafile": "ca.pem"}}, "unknown key(s) ['cafile']"),
    ({"tls": "yes"}, "source.tls: "),
    ({"keepalive_s": 0}, "source.keepalive_s: "),
    ({"topics": ["plant/#/cycle"]}, "not a topic filter"),
])
def test_check_rejects(tmp_path, source_keys, fragment):
    (tmp_path / "gw.pass").write_text("pw")
    spec = load(write_spec(tmp_path, "127.0.0.1:1883", **source_keys))
    with pytest.raises(SpecError, match=None) as err:
        source.check(spec)
    assert fragment in str(err.value) and str(err.value).startswith(str(tmp_path / "gateway.yaml"))


# -- the payload readers on their own ------------------------------------------------------------
def test_payload_readers():
    assert source.parse_json("t", b'{"a": 1, "s": {"T24": 2.5, "x": {"y": "z"}}}') == (
        {"a": 1, "s.T24": 2.5, "s.x.y": "z"}, None)
    flat = {"a": 1, "b": "x"}
    assert source.parse_json("t", json.dumps(flat).encode())[0] == flat
    assert source.parse_sparkplug("t", sparkplug([{"name": "a", "value": 1, "timestamp": 5},
                                                  {"name": "b", "is_null": True}], ts_ms=7)) == ({"a": 1}, 7)
    assert source.parse_sparkplug("t", b'{"metrics": [{"name": "a", "value": 1, "timestamp": 9}]}') == ({"a": 1}, 9)
    assert source.parse_value("p/T24", b" 641.5\n") == ({"p/T24": 641.5}, None)
    assert source.parse_value("p/unit", b"press-1") == ({"p/unit": "press-1"}, None)
    assert source.parse_value("p/unit", b'"7"') == ({"p/unit": "7"}, None)
    for parse, payload, kind in [(source.parse_json, b"", "payload (not JSON)"),
                                 (source.parse_json, b'"text"', "payload (not a JSON object)"),
                                 (source.parse_value, b"", "payload (empty)"),
                                 (source.parse_value, b"\xff", "payload (not UTF-8)"),
                                 (source.parse_value, b"nan", "payload (not a finite number)"),
                                 (source.parse_sparkplug, b'{"metrics": [{"name": "a"}]}',
                                  "sparkplug (metric without value)")]:
        with pytest.raises(source.Malformed, match=None) as err:
            parse("t", payload)
        assert str(err.value) == kind


def test_default_client_id_is_stable_per_store(tmp_path):
    one = load(write_spec(tmp_path, "127.0.0.1:1883"))
    assert source.default_client_id(one) == source.default_client_id(load(tmp_path / "gateway.yaml"))
    (tmp_path / "other").mkdir()
    other = load(write_spec(tmp_path / "other", "127.0.0.1:1883"))
    assert source.default_client_id(one) != source.default_client_id(other)
    assert source.default_client_id(one).startswith("iiotfl-")
