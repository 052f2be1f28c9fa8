"""What a gateway sends: inspect the real reply messages of the ClientApp for identifiers and raw records."""

from __future__ import annotations

import csv
import time
from datetime import datetime, timedelta

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

import iiotfl.clients.app as client
from iiotfl.configs import compose, to_run_config
from iiotfl.server.launch import validate
from iiotfl.tasks.predictive_maintenance.anonymise import anonymise, pseudonym
from iiotfl.tasks.predictive_maintenance.generator import generate_plant
from iiotfl.tasks.predictive_maintenance.loader import load_csv

SERIALS = ["SN-ACME-00042", "SN-ACME-00117", "SN-ACME-00308"]
SITE, OPERATOR = "Rotterdam Plant 3", "op-jdoe"
START = datetime(2026, 3, 1, 6, 0, 0)


@pytest.fixture
def plant_csv(tmp_path):
    data = generate_plant(0, 0, units_min=3, units_max=3, rul_cap=125)
    path = tmp_path / "plant.csv"
    raw = []
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["serial", "timestamp", "site", "operator", "s1", "s2", "s3", "s4"])
        for u, c, row in zip(data.unit, data.cycle, data.sensors):
            stamp = (START + timedelta(hours=7 * float(c))).isoformat()
            values = [f"{v:.4f}" for v in row[:4]]
            w.writerow([SERIALS[int(u) - 1], stamp, SITE, OPERATOR, *values])
            raw.append((stamp, [float(v) for v in values]))
    key = tmp_path / "plant.key"
    key.write_bytes(b"k" * 32)
    return path, key, raw


def _msg(content: RecordDict, message_type: str) -> Message:
    md = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="",
                  created_at=time.time(), ttl=600, message_type=message_type)
    return Message(content, metadata=md)


def _blob(msg: Message) -> bytes:
    """Everything a reply carries, as bytes: every array's buffer and every config/metric value."""
    out = []
    for rec in msg.content.array_records.values():
        out += [a.numpy().tobytes() for a in rec.values()]
    for rec in [*msg.content.config_records.values(), *msg.content.metric_records.values()]:
        for k, v in rec.items():
            out.append(f"{k}={v!r}".encode())
            values = v if isinstance(v, list) else [v]
            out += [np.asarray(values, dtype=np.float64).tobytes(), np.asarray(values, dtype=np.float32).tobytes()]
    return b"|".join(out)


def test_no_identifier_timestamp_or_raw_record_leaves_the_device(plant_csv, tmp_path):
    path, key, raw = plant_csv
    cfg = compose(["task.data.source=csv", f"task.data.path={path}", "task.data.csv.unit=serial",
                   "task.data.csv.time=timestamp", "task.data.csv.drop=[site,operator]", "task.data.csv.rul=null",
                   "task.features=[s1,s2,s3,s4]", "task.window=10", "privacy=sample", "privacy.epsilon=5"])
    validate(cfg)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "plant-key-file": str(key)},
                  state=RecordDict(), run_config=to_run_config(cfg, tmp_path))
    stats = client.feature_stats(_msg(RecordDict({"config": ConfigRecord({})}), "query.feature_stats"), ctx)
    sums = stats.content["stats"].to_numpy_ndarrays()[0]
    task = client.get_task(cfg["task"], cfg["seed"])
    model = task.build_model()
    config = ConfigRecord({"local-epochs": 1, "batch-size": 32, "lr": 0.001, "server-round": 1,
                           "norm-sums": [float(v) for v in sums.ravel()], "norm-cols": int(sums.shape[1])})
    arrays = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in model.state_dict().items()})
    reply = client.train(_msg(RecordDict({"arrays": arrays, "config": config}), MessageType.TRAIN), ctx)
    assert not reply.has_error() and "update" in reply.content
    sent = _blob(stats) + _blob(reply)
    for secret in [*SERIALS, SITE, OPERATOR, "ACME", "Rotterdam", "jdoe"]:
        assert secret.encode() not in sent and secret.encode("utf-16-le") not in sent
    for stamp, values in raw[:50]:
        assert stamp.encode() not in sent
        epoch = datetime.fromisoformat(stamp).timestamp()
        assert np.float64(epoch).tobytes() not in sent
        for dtype in (np.float32, np.float64):  # a raw record is never sent, whole or as its sensor row
            assert np.asarray(values, dtype=dtype).tobytes() not in sent
    # what does leave: sums over the plant (counts, sums, squares per condition) and a noised update
    train, _ = task.gateway_data(0, ctx.node_config)
    assert int(sums[:, 0].sum()) == len(train) < len(raw)
    assert reply.content["metrics"]["dp-epsilon"] > 0


def test_identifiers_become_keyed_pseudonyms(plant_csv):
    path, _, _ = plant_csv
    data = load_csv(path, unit="serial", time="timestamp", sensors=["s1", "s2"], rul=None)
    a = anonymise(data, b"a" * 32)
    b = anonymise(data, b"b" * 32)
    assert a.extra == {} and a.source == "" and "SN-ACME" not in repr(a)
    assert set(np.unique(a.cycle)) == set(range(1, int(np.bincount(a.unit).max()) + 1))  # positions, not times
    assert pseudonym(b"a" * 32, SERIALS[0]) != pseudonym(b"b" * 32, SERIALS[0])  # keyed: per plant
    assert pseudonym(b"a" * 32, SERIALS[0]) == pseudonym(b"a" * 32, SERIALS[0])
    assert sorted(np.bincount(a.unit)[1:]) == sorted(np.bincount(data.unit)[1:])  # units kept whole
    assert np.array_equal(np.sort(a.sensors, axis=0), np.sort(data.sensors, axis=0))
    assert b.unit.shape == a.unit.shape


def test_csv_drop_keeps_identifier_columns_out(plant_csv):
    path, _, _ = plant_csv
    with pytest.raises(Exception, match="site"):
        load_csv(path, unit="serial", time="timestamp", rul=None)  # 'site' taken for a sensor: not numeric
    data = load_csv(path, unit="serial", time="timestamp", rul=None, drop=["site", "operator"])
    assert data.sensor_names == ("s1", "s2", "s3", "s4")
