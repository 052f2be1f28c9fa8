"""Simulated plant equipment for trying a gateway's live sources: ``iiotfl simulate``.

A machine's records come from the project's generators (``tasks/*/generator.py``,
``tasks/energy_anomaly/smart_meter.py``), named as a plant would name them (:data:`PLANT_NAMES`),
and are published over MQTT (one JSON message per record) or served by an OPC UA server (one
variable per signal under ``Objects/<machine>``, the record's key written last). :func:`describe`
writes the gateway's data description that reads them, so ``iiotfl simulate ... --describe
gateway.yaml`` and ``iiotfl gateway --source gateway.yaml`` fit together.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from asyncua import Server, ua

from iiotfl.tasks.energy_anomaly.smart_meter import generate_site
from iiotfl.tasks.predictive_maintenance.generator import SENSORS, generate_plant
from iiotfl.tasks.quality_control.generator import generate_plant as process_records
from iiotfl.tasks.quality_control.loader import COLUMNS

# the task's column -> the simulated plant's name for it (what a description's signals map)
PLANT_NAMES: dict[str, dict[str, str]] = {
    "predictive_maintenance": {"unit": "machine", "cycle": "cycle_count", "failed": "failure",
                               **{s: f"{s.lower()}_raw" for s in SENSORS}},
    "quality_control": {k: v for k, v in COLUMNS.items()},
    "energy_anomaly": {"timestamp": "ts", "target": "load_dev", "temp": "temp_c", "temp_typical": "temp_typical_c",
                       "label": "alarm"},
}
ROW_KEYS = {"predictive_maintenance": "cycle", "quality_control": "udi", "energy_anomaly": "timestamp"}
TASK_OVERRIDES = {"energy_anomaly": ["task.data.source=smart_meter"]}  # the simulated site is a metered one


def records(task: str, seed: int = 0, plant: int = 0, limit: int | None = None,
            repeat: bool = False) -> Iterator[dict[str, Any]]:
    """A simulated machine's records, each a dict of the plant's names -> values; with ``repeat`` the
    machine goes on (fresh units, process ids and times each pass) until ``limit``."""
    names = PLANT_NAMES[task]
    key = names[ROW_KEYS[task]]
    n = 0
    for lap in itertools.count():
        rows = list(_pass(task, seed, plant))
        for row in rows:
            if limit is not None and n >= limit:
                return
            if lap and task == "predictive_maintenance":
                row[names["unit"]] = f"{row[names['unit']]}.{lap}"
            elif lap:  # process ids and timestamps go on
                row[key] = row[key] + lap * (rows[-1][key] - rows[0][key] + (1 if task == "quality_control" else 3600))
            n += 1
            yield row
        if not repeat:
            return


def _pass(task: str, seed: int, plant: int) -> Iterator[dict[str, Any]]:
    names = PLANT_NAMES[task]
    if task == "predictive_maintenance":
        data = generate_plant(seed, plant, units_min=4, units_max=6)
        rows: Iterator[dict[str, Any]] = (
            {names["unit"]: f"M-{plant}-{int(data.unit[i])}", names["cycle"]: int(data.cycle[i]),
             **{names[s]: round(float(data.sensors[i, j]), 4) for j, s in enumerate(data.sensor_names)
                if s in names},
             names["failed"]: int(i + 1 == len(data) or data.unit[i + 1] != data.unit[i])}  # run to failure
            for i in range(len(data)))
    elif task == "quality_control":
        q = process_records(seed, plant, 2000)
        f = {n: q.features[:, i] for i, n in enumerate(q.feature_names)}
        keys = ("air_temperature_K", "process_temperature_K", "rotational_speed_rpm", "torque_Nm", "tool_wear_min")
        rows = ({names["udi"]: int(q.udi[i]), names["product_id"]: str(q.product_id[i]),
                 names["type"]: "LMH"[int(q.product_type[i])],
                 **{names[c]: round(float(f[k][i]), 2) for c, k in zip(("air", "process", "speed", "torque", "wear"),
                                                                       keys)},
                 **{COLUMNS[m.lower()] if m.lower() in COLUMNS else m: int(v) for m, v in
                    zip(("machine_failure", "twf", "hdf", "pwf", "osf", "rnf"), q.labels[i])}}
                for i in range(len(q)))
    else:
        site = generate_site(seed, plant, 56, 14, 1)
        start = 1_700_000_000 - 1_700_000_000 % 3600
        rows = ({names["timestamp"]: start + 3600 * int(site.step[i]),
                 names["target"]: round(float(site.target[i]), 5), names["temp"]: round(float(site.inputs[i, 0]), 3),
                 names["temp_typical"]: round(float(site.inputs[i, 1]), 3), names["label"]: int(max(site.label[i], 0))}
                for i in range(len(site)) if np.isfinite(site.target[i]))
    yield from rows


def write_csv(rows: Iterator[dict[str, Any]], path: str | Path, sep: str = ",") -> int:
    """A plant's CSV export of the records (its own column names, ``sep``); how many rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = next(rows, None)
    if first is None:
        return 0
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.DictWriter(fh, fieldnames=list(first), delimiter=sep)
        out.writeheader()
        out.writerow(first)
        n = 1
        for row in rows:
            out.writerow(row)
            n += 1
    return n


def describe(task: str, kind: str, path: str | Path, *, broker: str = "127.0.0.1:1883", topic: str = "plant/line1/m0",
             endpoint: str = "opc.tcp://127.0.0.1:4840", machine: str = "Machine0", store: str | None = None,
             export: str = "export", sep: str = ",") -> Path:
    """Write the gateway's data description of a simulated machine (YAML) to ``path``."""
    path = Path(path)
    names = PLANT_NAMES[task]
    if kind == "csv":
        source: dict[str, Any] = {"kind": "csv", "path": export, "sep": sep}
        signals: dict[str, Any] = dict(names)
        extra: dict[str, Any] = {}
    elif kind == "mqtt":
        source = {"kind": "mqtt", "broker": broker, "topics": [topic], "format": "json", "qos": 1}
        signals = dict(names)
        extra = {}
    else:
        source = {"kind": "opcua", "endpoint": endpoint, "mode": "subscribe", "interval_s": 0.05}
        signals = {c: f"{machine}/{n}" for c, n in names.items()}
        extra = {"row_key": ROW_KEYS[task]}
    raw = {"task": task, "source": source, "signals": signals, **extra}
    if kind != "csv":
        raw["store"] = {"path": store or f"{path.stem}-store.sqlite", "max_mb": 64}
    path.write_text(f"# a simulated {task} machine over {kind} (iiotfl simulate)\n"
                    + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=100))
    return path


def publish_mqtt(broker: str, topic: str, rows: Iterator[dict[str, Any]], rate_hz: float, qos: int = 1,
                 say=print) -> int:
    """Publish each record as one JSON message at ``rate_hz`` (0: as fast as the broker takes them)."""
    host, _, port = broker.rpartition(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"iiotfl-simulate-{topic}")
    while True:
        try:
            client.connect(host, int(port))
            break
        except OSError as err:
            say(f"iiotfl simulate: broker {broker} unreachable ({err}); retrying in 1 s")
            time.sleep(1.0)
    client.loop_start()
    sent, started = 0, time.monotonic()
    try:
        for row in rows:
            while not client.is_connected():  # the broker restarts: paho reconnects, the machine waits
                time.sleep(0.1)
            info = client.publish(topic, json.dumps(row), qos=qos)
            if qos:
                try:
                    info.wait_for_publish(timeout=60)
                except RuntimeError:  # it went down just now: paho sends the queued message on reconnect
                    deadline = time.monotonic() + 60
                    while not info._published and time.monotonic() < deadline:
                        time.sleep(0.05)
            sent += 1
            if rate_hz > 0:
                time.sleep(max(0.0, started + sent / rate_hz - time.monotonic()))
    finally:
        client.loop_stop()
        client.disconnect()
    return sent


async def _serve_opcua(listen: str, machine: str, key: str, rows: Iterator[dict[str, Any]], rate_hz: float,
                       ready: Callable[[], None] | None = None) -> int:
    host, _, port = listen.rpartition(":")
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://{host}:{port}")
    server.set_server_name(f"iiotfl simulated {machine}")
    ns = await server.register_namespace("urn:iiotfl:simulate")
    obj = await server.nodes.objects.add_object(ns, machine)
    first = next(rows, None)
    if first is None:
        return 0
    nodes = {}
    for name, value in first.items():
        kind = ua.VariantType.String if isinstance(value, str) else ua.VariantType.Double
        nodes[name] = (await obj.add_variable(f"ns={ns};s={machine}.{name}", f"{ns}:{name}",
                                              ua.Variant(value if kind is ua.VariantType.String else float(value),
                                                         kind)), kind)
    order = [n for n in nodes if n != key] + ([key] if key in nodes else [])  # the record's key written last
    sent, started = 0, time.monotonic()
    async with server:
        if ready is not None:
            ready()
        row: dict[str, Any] | None = first
        while row is not None:
            for name in order:
                node, kind = nodes[name]
                value = row.get(name)
                if value is not None:
                    await node.write_value(ua.Variant(value if kind is ua.VariantType.String else float(value), kind))
            sent += 1
            wait = started + sent / rate_hz - time.monotonic() if rate_hz > 0 else 0.0
            await asyncio.sleep(max(0.0, wait))
            row = next(rows, None)
        await asyncio.sleep(2.0)  # the last record's notification reaches the subscribers
    return sent


def serve_opcua(listen: str, machine: str, task: str, rows: Iterator[dict[str, Any]], rate_hz: float,
                ready: Callable[[], None] | None = None) -> int:
    """Serve a machine's records as an OPC UA server at ``listen`` (host:port): one variable per signal
    under ``Objects/<machine>`` (node ids ``ns=2;s=<machine>.<name>``), each record's key written last."""
    key = PLANT_NAMES[task][ROW_KEYS[task]]
    return asyncio.run(_serve_opcua(listen, machine, key, rows, rate_hz, ready))
