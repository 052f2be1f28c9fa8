"""A gateway's description of its own data: where it comes from and how it maps to the task.

The file lives on the gateway (``iiotfl gateway --source gateway.yaml``); the server never sees
it. The server chooses the task, the features its model uses and the evaluation; the gateway says
which of its signals is which of the task's columns. Example (every key is checked when the file
is loaded, each problem one line naming the file, the key and the fix)::

    task: predictive_maintenance     # the schema this plant's data is in
    source:
      kind: mqtt                     # csv | opcua | mqtt (the keys of each: SOURCE_KEYS)
      broker: 10.77.0.1:1883
      topics: [plant/line1/+/cycle]
      format: json                   # json | sparkplug | value
    signals:                         # the task's column: this plant's name for it
      unit: machine                  # a CSV column, a JSON field, an OPC UA node id or browse path
      cycle: cycle_count
      T24: {name: t_lpc_out_degC, scale: 1.8, offset: 491.67}   # value x scale + offset
      wind_dir_sin: {name: Wa_avg, fn: sin}                      # fn: sin | cos of degrees
    row_key: cycle                   # separate signals (OPC UA nodes, one-value topics) become one
                                     # record each time this column changes
    timestamp: ts                    # optional: the plant's field with each message's time
    max_skew_s: 300                  # a source time further than this from the gateway's clock is
                                     # replaced by the arrival time (and counted)
    stale_after_s: 60                # a signal not updated for this long is flagged stale
    store: {path: store.sqlite, max_mb: 256, max_age_days: 365}

Relative paths are relative to the file. ``load(path)`` returns a :class:`DataSpec`;
``from_flags`` builds one for the simple CSV case (``--data DIR --sep ';' --column unit=Maschine``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from iiotfl.configs import compose
from iiotfl.tasks import TASKS, get_task, task_class

KINDS = ("csv", "opcua", "mqtt")
FORMATS = ("json", "sparkplug", "value")
FUNCTIONS = ("sin", "cos")
SOURCE_KEYS = {
    "csv": {"path", "sep", "encoding"},
    "opcua": {"endpoint", "mode", "interval_s", "security", "username", "password_file", "timeout_s"},
    "mqtt": {"broker", "topics", "format", "qos", "client_id", "tls", "username", "password_file", "keepalive_s"},
}
TOP_KEYS = {"task", "source", "signals", "row_key", "timestamp", "max_skew_s", "stale_after_s", "store"}
STORE_KEYS = {"path", "max_mb", "max_age_days", "flush_s"}


class SpecError(ValueError):
    """A data description the gateway cannot use: one line naming the file, the key and the fix."""


@dataclass(frozen=True)
class Signal:
    """One task column: the plant's name for it and how its value is turned into the task's unit."""

    column: str
    name: str
    scale: float = 1.0
    offset: float = 0.0
    fn: str | None = None

    def convert(self, value: Any) -> Any:
        """The task's value of a raw reading: numbers scaled (and through ``fn``), text kept as it is."""
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)):
            x = float(value) * self.scale + self.offset
            if self.fn == "sin":
                return float(np.sin(np.radians(x)))
            if self.fn == "cos":
                return float(np.cos(np.radians(x)))
            return x
        return value


@dataclass(frozen=True)
class DataSpec:
    """A checked data description (see the module docstring)."""

    path: Path                       # the file it came from (or where the flags' version is kept)
    task: str
    kind: str
    source: Mapping[str, Any]
    signals: tuple[Signal, ...]
    row_key: str | None = None
    timestamp: str | None = None
    max_skew_s: float = 300.0
    stale_after_s: float = 60.0
    store_path: Path | None = None
    max_mb: float = 256.0
    max_age_days: float | None = None
    flush_s: float = 0.2
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return [s.column for s in self.signals]

    def by_name(self) -> dict[str, list[Signal]]:
        """The plant's name -> the task columns it feeds (one signal may feed two, e.g. sin and cos)."""
        out: dict[str, list[Signal]] = {}
        for s in self.signals:
            out.setdefault(s.name, []).append(s)
        return out

    def resolve(self, value: str | Path) -> Path:
        """A path of the description, relative to its file."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def missing_for(self, required: list[str]) -> list[str]:
        return [c for c in required if c not in self.columns]

    def mismatch(self, task_name: str, required: list[str]) -> str | None:
        """One line saying why this gateway's data cannot feed a run of ``task_name`` needing
        ``required``; None when it can."""
        if task_name != self.task:
            return (f"this gateway's data description {self.path} offers task {self.task!r}, the run's task is "
                    f"{task_name!r}; run task={self.task} or describe this plant's {task_name} data")
        missing = self.missing_for(required)
        if missing:
            return (f"this gateway's data description {self.path} maps no signal to {missing}, which this run of "
                    f"{task_name} needs (it maps {self.columns}); add them under signals: or leave them out of "
                    "the run's task.features")
        return None


def _fail(where: str, what: str) -> SpecError:
    return SpecError(f"{where}: {what}")


def _number(raw: Mapping[str, Any], key: str, where: str, low: float, default: float | None) -> float | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise _fail(where, f"{key}: {value!r} is not a number >= {low:g}; give e.g. {key}: {default or low:g}")
    return float(value)


def _signal(column: str, raw: Any, where: str) -> Signal:
    if isinstance(raw, (str, int)) and not isinstance(raw, bool):
        return Signal(column, str(raw))
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), (str, int)):
        raise _fail(where, f"signals.{column}: give the plant's name for it (a column, field, node id or topic), "
                    f"or {{name: ..., scale: ..., offset: ..., fn: sin|cos}}; got {raw!r}")
    unknown = set(raw) - {"name", "scale", "offset", "fn", "unit"}
    if unknown:
        raise _fail(where, f"signals.{column}: unknown key(s) {sorted(unknown)}; use name, scale, offset, fn, unit")
    fn = raw.get("fn")
    if fn is not None and fn not in FUNCTIONS:
        raise _fail(where, f"signals.{column}.fn: {fn!r} is not one of {list(FUNCTIONS)} (of an angle in degrees)")
    scale = raw.get("scale", 1.0)
    offset = raw.get("offset", 0.0)
    for key, value in (("scale", scale), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise _fail(where, f"signals.{column}.{key}: {value!r} is not a finite number")
    return Signal(column, str(raw["name"]), float(scale), float(offset), fn)


def _source(raw: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(raw, Mapping) or raw.get("kind") not in KINDS:
        kind = raw.get("kind") if isinstance(raw, Mapping) else raw
        raise _fail(where, f"source.kind: {kind!r} is not one of {list(KINDS)}; e.g. source: {{kind: csv, path: "
                    "exports/}")
    kind = str(raw["kind"])
    unknown = set(raw) - SOURCE_KEYS[kind] - {"kind"}
    if unknown:
        raise _fail(where, f"source: unknown key(s) {sorted(unknown)} for kind {kind}; it takes "
                    f"{sorted(SOURCE_KEYS[kind])}")
    src = {k: v for k, v in raw.items() if k != "kind"}
    if kind == "csv":
        if not src.get("path"):
            raise _fail(where, "source.path: give the plant's CSV file or export directory")
        sep = src.setdefault("sep", ",")
        if not isinstance(sep, str) or len(sep) != 1:
            raise _fail(where, f"source.sep: {sep!r} is not one character; e.g. sep: \";\"")
    elif kind == "opcua":
        endpoint = src.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("opc.tcp://", "opc.tcp:")):
            raise _fail(where, f"source.endpoint: {endpoint!r} is not an OPC UA endpoint; e.g. "
                        "opc.tcp://10.77.0.5:4840")
        if src.setdefault("mode", "subscribe") not in ("subscribe", "poll"):
            raise _fail(where, f"source.mode: {src['mode']!r} is not subscribe or poll")
        _number(src, "interval_s", where + ": source", 0.01, 1.0)
    else:
        broker = src.get("broker")
        if not isinstance(broker, str) or not broker.rpartition(":")[2].isdigit():
            raise _fail(where, f"source.broker: {broker!r} is not host:port; e.g. broker: 10.77.0.1:1883")
        topics = src.get("topics")
        if isinstance(topics, str):
            src["topics"] = topics = [topics]
        if not topics or not all(isinstance(t, str) and t for t in topics):
            raise _fail(where, "source.topics: give the topic filters to subscribe to, e.g. [plant/line1/#]")
        if src.setdefault("format", "json") not in FORMATS:
            raise _fail(where, f"source.format: {src['format']!r} is not one of {list(FORMATS)}")
        if src.setdefault("qos", 1) not in (0, 1, 2):
            raise _fail(where, f"source.qos: {src['qos']!r} is not 0, 1 or 2")
    return kind, src


def parse(raw: Any, path: Path) -> DataSpec:
    """A :class:`DataSpec` from a description's content (a mapping), read from ``path``."""
    where = str(path)
    if not isinstance(raw, Mapping):
        raise _fail(where, "not a data description (a YAML mapping with task, source and signals)")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)}; a data description has {sorted(TOP_KEYS)}")
    task = raw.get("task")
    if task not in TASKS:
        raise _fail(where, f"task: {task!r} is not one of {list(TASKS)}; name the schema this plant's data is in")
    kind, src = _source(raw.get("source"), where)
    signals_raw = raw.get("signals") or {}
    if not isinstance(signals_raw, Mapping) or not signals_raw:
        raise _fail(where, "signals: map each of the task's columns to this plant's name for it, e.g. "
                    "signals: {unit: machine, cycle: cycle_count}")
    signals = tuple(_signal(str(c), v, where) for c, v in signals_raw.items())
    row_key = raw.get("row_key")
    if row_key is not None and row_key not in signals_raw:
        raise _fail(where, f"row_key: {row_key!r} is not one of the mapped columns {list(signals_raw)}")
    needs_key = kind == "opcua" and src["mode"] == "subscribe" or kind == "mqtt" and src["format"] == "value"
    if needs_key and row_key is None:
        raise _fail(where, f"row_key: a {kind} source with separate signals needs the column whose change ends a "
                    "record (e.g. row_key: cycle)")
    store = raw.get("store") or {}
    if not isinstance(store, Mapping) or set(store) - STORE_KEYS:
        raise _fail(where, f"store: give a mapping with keys {sorted(STORE_KEYS)}")
    spec = DataSpec(path=path.resolve(), task=str(task), kind=kind, source=src, signals=signals, row_key=row_key,
                    timestamp=raw.get("timestamp"),
                    max_skew_s=_number(raw, "max_skew_s", where, 0.0, 300.0) or 0.0,
                    stale_after_s=_number(raw, "stale_after_s", where, 0.1, 60.0) or 60.0,
                    max_mb=_number(store, "max_mb", where + ": store", 0.01, 256.0) or 256.0,
                    max_age_days=_number(store, "max_age_days", where + ": store", 0.0, None),
                    flush_s=_number(store, "flush_s", where + ": store", 0.0, 0.2) or 0.0)
    if kind != "csv":
        return replace(spec, store_path=spec.resolve(store.get("path") or "store.sqlite"))
    return spec


def load(path: str | Path) -> DataSpec:
    """Read and check a gateway's data description (YAML or JSON)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"data description {path} not found; write one (docs/plant-pilot.md) "
                        "or pass --data DIR for a CSV export")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise SpecError(f"{path}: not readable YAML{at}; fix the file ({type(err).__name__})") from None
    return parse(raw, path)


def from_flags(task: str, data: str, sep: str = ",", columns: list[str] | None = None,
               keep: str | Path | None = None) -> DataSpec:
    """The description of a CSV export given as flags: ``--data DIR --sep ';' --column unit=Maschine``.
    Columns not named keep the task's own names; ``keep`` is where the resolved description is
    written for the ClientApp (a JSON file, which YAML reads too)."""
    mapping: dict[str, str] = {}
    for item in columns or []:
        column, eq, name = item.partition("=")
        if not eq or not column.strip() or not name.strip():
            raise SpecError(f"--column {item!r}: give TASK_COLUMN=PLANT_COLUMN, e.g. --column unit=Maschine")
        mapping[column.strip()] = name.strip()
    required, optional = default_task(task).table_columns()
    names = getattr(task_class(task), "export_names", {})  # a published layout's own header (AI4I)
    signals = {c: mapping.pop(c, names.get(c, c)) for c in [*required, *optional]}
    signals.update(mapping)
    raw = {"task": task, "source": {"kind": "csv", "path": str(Path(data).resolve()), "sep": sep},
           "signals": signals}
    path = Path(keep) if keep else Path(data).resolve().parent / "gateway-data.json"
    spec = parse(raw, path)
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        Path(keep).write_text(json.dumps(raw, indent=1))
    return spec



def default_task(task: str, overrides: list[str] | None = None):
    """The task ``task`` under its default config (and ``overrides``): what a gateway checks its data
    against before it knows a run's."""
    if task not in TASKS:
        raise SpecError(f"task {task!r} is not one of {list(TASKS)}")
    cfg = compose([f"task={task}", *(overrides or [])])
    return get_task(cfg["task"], int(cfg["seed"]))
