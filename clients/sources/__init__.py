"""A gateway's own data: its description, its live sources, its local store, and what the ClientApp reads.

One path from a machine to training::

    gateway.yaml (spec.py) --> source (csv | opcua.py | mqtt.py) --> intake.py --> store.py (SQLite)
                                                                                     |
    ClientApp, every round: gateway_records() --> read_table() --> task.from_table() -+

* ``iiotfl gateway --source gateway.yaml`` checks the description, starts :func:`collect` (a live
  source feeding the store in the background) and passes ``data-spec=<the file>`` in the node
  config; ``iiotfl gateway --data DIR [--sep ';'] [--column unit=Maschine]`` describes a CSV export
  with flags. A plain ``flower-supernode`` takes ``--node-config 'data-spec="/path/gateway.yaml"'``
  and ``iiotfl collect gateway.yaml`` beside it for a live source.
* The ClientApp calls :func:`gateway_records` each round. It checks that the description offers
  what the run's task needs (:meth:`~spec.DataSpec.mismatch`: one line, which the gateway's log and
  the server's output both show), reads the CSV export or the whole local store, and builds the
  task's records (``Task.from_table``: the task's own value checks).

A source module has ``run(spec, intake, stop)``: it connects, feeds ``intake`` until ``stop`` is set,
and retries an unreachable endpoint with backoff (1 s doubling to ``RETRY_MAX_S``) while training
goes on with the stored history; and ``check(spec)``: the static checks of its keys (files that must
exist) for ``iiotfl gateway --check``.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Callable, Mapping

from iiotfl.clients.sources import store
from iiotfl.clients.sources.intake import RETRY_MAX_S, Intake
from iiotfl.clients.sources.spec import DataSpec, SpecError, load
from iiotfl.clients.sources.store import Store, StoreError
from iiotfl.tasks import ROW
from iiotfl.tasks.predictive_maintenance.loader import csv_lines, unsplit_header

LIVE = {"opcua": "iiotfl.clients.sources.opcua", "mqtt": "iiotfl.clients.sources.mqtt"}
# the columns that name one record of a task: a repeated one (a redelivered message, a replayed
# history) keeps its last version in the store's table
IDENTITY = {"predictive_maintenance": ("unit", "cycle"), "energy_anomaly": ("timestamp",),
            "quality_control": ("udi",)}


class DataMismatch(ValueError):
    """The gateway's data cannot feed this run's task: one line naming what is missing and the fix."""


def source_module(kind: str):
    return importlib.import_module(LIVE[kind])


def open_store(spec: DataSpec) -> Store:
    assert spec.store_path is not None, f"a {spec.kind} source has a store"
    return Store(spec.store_path, spec.task, spec.max_mb, spec.max_age_days)


def collect(spec: DataSpec, stop: threading.Event, say: Callable[[str], None] = print) -> threading.Thread:
    """Run the description's live source into its store in a background thread until ``stop``."""
    module = source_module(spec.kind)
    store = open_store(spec)
    intake = Intake(spec, store, say=say).start()

    def run() -> None:
        try:
            module.run(spec, intake, stop)
        except Exception as err:  # noqa: BLE001 - a collector must say why it ended, not vanish
            say(f"iiotfl gateway: the {spec.kind} source stopped: {type(err).__name__}: {err}")
            raise
        finally:
            intake.stop()
            store.close()

    thread = threading.Thread(target=run, name=f"collect-{spec.kind}", daemon=True)
    thread.start()
    return thread


def check(spec: DataSpec, task) -> list[str]:
    """``iiotfl gateway --check``: the description against ``task``'s columns (a run's task object, or
    :func:`spec.default_task`), its source's files and its store; a CSV export is read into the task's
    records. Raises SpecError / DataMismatch / ValueError with one line; returns what was checked."""
    required, _ = task.table_columns()
    why = spec.mismatch(task.name, required)
    if why:
        raise DataMismatch(why)
    done = [f"maps every column task {spec.task} needs ({', '.join(required)})"]
    if spec.kind == "csv":
        done.append(f"reads {len(task_records(task, spec, 0, {}))} records from {spec.source['path']}")
    else:
        source_module(spec.kind).check(spec)
        store = open_store(spec)
        done.append(f"store {spec.store_path}: {store.count()} records, at most {spec.max_mb:g} MiB")
        store.close()
    return done


# -- the ClientApp's side ---------------------------------------------------------------------
def _csv_table(spec: DataSpec, columns: list[str], required: list[str]) -> dict[str, list]:
    path = spec.resolve(spec.source["path"])
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise SpecError(f"{path}: no *.csv files (source.path of {spec.path}); export the plant's records there")
    sep = spec.source.get("sep", ",")
    names = {s.column: s for s in spec.signals}
    table: dict[str, list] = {}
    for file in files:
        lines = csv_lines(file, sep, spec.source.get("encoding", "utf-8"), f"source.sep of {spec.path}")
        if not lines:
            continue
        header = [h.strip() for h in lines[0][1]]
        if unsplit_header(lines[0][1], sep):
            raise SpecError(f"{file}: header {lines[0][1][0]!r} was not split by separator {sep!r}; set source.sep in "
                            f"{spec.path} (or --sep)")
        for n, r in lines[1:]:
            if len(r) != len(header):
                raise SpecError(f"{file}: row {n} has {len(r)} fields, the header {len(header)}; fix that row or "
                                "source.sep")
        for column in columns:
            signal = names.get(column)
            if signal is None or signal.name not in header:
                if column in required:
                    have = f"signals.{column} is {signal.name!r}" if signal else f"no signals.{column}"
                    raise SpecError(f"{file}: no column for {column} ({have}; the header has {header}); fix "
                                    f"signals.{column} in {spec.path} or pass --column {column}=<your column>")
                continue
            j = header.index(signal.name)
            scaled = signal.fn or signal.scale != 1.0 or signal.offset
            table.setdefault(column, []).extend(
                signal.convert(float(r[j].strip())) if scaled and _numeric(r[j].strip()) else r[j].strip()
                for _, r in lines[1:])
        table.setdefault(ROW, []).extend(f"{file}: row {n}" for n, _ in lines[1:])
    return table


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _store_table(spec: DataSpec, columns: list[str], required: list[str]) -> dict[str, list]:
    assert spec.store_path is not None, f"a {spec.kind} source has a store"
    records = store.read(spec.store_path, spec.task)
    identity = IDENTITY.get(spec.task, ())
    latest: dict[Any, int] = {}
    kept: list[dict[str, Any]] = []
    for _, ts, record in records:
        record.setdefault("timestamp", ts)  # the record's time, when no signal is the timestamp
        if any(record.get(c) is None for c in required):
            continue  # an incomplete record (the first ones before every signal arrived)
        if all(c in record for c in identity):
            key = tuple(record[c] for c in identity)
            if key in latest:
                kept[latest[key]] = {}  # a repeat: the last version counts
            latest[key] = len(kept)
        kept.append(record)
    kept = [r for r in kept if r]
    present = [c for c in columns if c in required or (kept and all(c in r for r in kept))]
    return {c: [r[c] for r in kept] for c in present}


def read_table(spec: DataSpec, columns: list[str], required: list[str] | None = None) -> dict[str, list]:
    """The gateway's records as columns (task column -> values): its CSV export, or its whole store."""
    required = list(columns if required is None else required)
    if spec.kind == "csv":
        return _csv_table(spec, columns, required)
    return _store_table(spec, columns, required)


def gateway_records(task, node_config: Mapping[str, Any], partition: int) -> Any | None:
    """The run's task's records of this gateway, from its data description (node config ``data-spec``);
    None when it has none (generated data, or ``data-path``)."""
    path = node_config.get("data-spec")
    return task_records(task, load(str(path)), partition, node_config) if path else None


def task_records(task, spec: DataSpec, partition: int, node_config: Mapping[str, Any]) -> Any:
    """``task``'s records of the data ``spec`` describes (a DataMismatch when it cannot feed ``task``)."""
    required, optional = task.table_columns()
    why = spec.mismatch(task.name, required)
    if why:
        raise DataMismatch(why)
    try:
        table = read_table(spec, [*required, *[c for c in optional if c in spec.columns]], required)
    except StoreError as err:
        raise DataMismatch(str(err)) from None
    where = str(spec.resolve(spec.source["path"])) if spec.kind == "csv" else f"{spec.store_path}"
    if not table or not next(iter(table.values()), None):
        raise DataMismatch(f"{where}: no complete records yet (the {spec.kind} source has delivered none with every "
                           f"column {required}); see the gateway's status")
    return task.from_table(table, partition, node_config, source=where)


__all__ = ["RETRY_MAX_S", "DataMismatch", "DataSpec", "Intake", "SpecError", "Store", "StoreError", "check", "collect",
           "gateway_records", "load", "read_table", "task_records"]
