"""Where a live source's readings enter the gateway: mapped to the task's columns, made into
records, time-checked, batched into the local store, and watched.

A source (``opcua.py``, ``mqtt.py``) calls, from any thread:

* ``intake.values({plant_name: value, ...}, ts)`` for one message's readings (a JSON payload, a
  Sparkplug-like metrics list, a batch of OPC UA data changes, one poll); names the data
  description does not map are ignored;
* ``intake.malformed(kind, detail)`` for a message it could not read: counted in the status and
  logged once per kind, never raised;
* ``intake.connected(up, detail)`` when its connection comes or goes.

Records. Without ``row_key`` every call is one record (a JSON message is a row). With it, the
readings are held (each column keeps its last value) and a record is written each time the
``row_key`` column changes: the machine writes its cycle counter (or process id) last.

Time. A record's time is the source's timestamp (the description's ``timestamp`` field, or the
OPC UA source timestamp) when it is within ``max_skew_s`` of the gateway's clock, else the arrival
time; such records are counted as ``skewed`` and logged once. The store's age bound uses arrival
times only, so a machine with a wrong clock can neither keep old records alive nor push new ones
out.

Status. Every two seconds the intake writes ``status.json`` beside the store: connection, records
received and stored, malformed messages by kind, skewed times, and the signals that have not
updated for ``stale_after_s`` (``stale``), which are also logged when they go stale and recover.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from iiotfl.clients.sources.spec import DataSpec
from iiotfl.clients.sources.store import Store

BATCH = 2000
STATUS_EVERY_S = 2.0
RETRY_MAX_S = 60.0  # a source's longest wait between reconnects (1 s doubling to it)


def retry_max_s() -> float:
    """The longest wait between a source's reconnects: ``RETRY_MAX_S``, or ``$IIOTFL_SOURCE_RETRY_MAX_S``."""
    try:
        value = float(os.environ.get("IIOTFL_SOURCE_RETRY_MAX_S") or RETRY_MAX_S)
    except ValueError:
        return RETRY_MAX_S
    return value if value > 0 and math.isfinite(value) else RETRY_MAX_S


def epoch_seconds(value: Any) -> float | None:
    """A timestamp as epoch seconds: numbers above 1e11 are taken as milliseconds; ISO 8601 text as
    UTC when it names no zone; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        v = float(value)
        return v / 1000.0 if abs(v) > 1e11 else v if math.isfinite(v) else None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    try:
        stamp = datetime.fromisoformat(str(value).strip())
    except ValueError:
        try:
            return epoch_seconds(float(str(value)))
        except ValueError:
            return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()


class Intake:
    """The description's mapping, record assembly, batching into ``store`` and the status."""

    def __init__(self, spec: DataSpec, store: Store, clock: Callable[[], float] = time.time,
                 say: Callable[[str], None] = print) -> None:
        self.spec, self.store, self.clock, self.say = spec, store, clock, say
        self._names = spec.by_name()
        self._lock = threading.Lock()
        self._status_lock = threading.Lock()
        self._pending: list[tuple[float, float, dict[str, Any]]] = []
        self._held: dict[str, Any] = {}
        self._last_key: Any = None
        self._flushed = clock()
        self._started = clock()
        self.seen: dict[str, float] = {}       # column -> arrival of its last reading
        self.malformed_counts: dict[str, int] = {}
        self.received = 0                      # messages given to values()
        self.recorded = 0                      # records committed to the store
        self.skewed = 0
        self.up = False
        self.detail = "not connected yet"
        self._stale: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what sources call --------------------------------------------------------------------
    def values(self, values: Mapping[str, Any], ts: Any = None) -> None:
        now = self.clock()
        mapped: dict[str, Any] = {}
        for name, raw in values.items():
            for signal in self._names.get(str(name), ()):
                try:
                    mapped[signal.column] = signal.convert(raw)
                except (TypeError, ValueError):
                    self.malformed(f"value of {name}", f"{raw!r} cannot be converted for {signal.column}")
        stamp = values.get(self.spec.timestamp) if self.spec.timestamp else None
        when = epoch_seconds(stamp if stamp is not None else ts) if (stamp is not None or ts is not None) else None
        with self._lock:
            self.received += 1
            if not mapped:
                return
            for column in mapped:
                self.seen[column] = now
            if when is None:
                when = now
            elif abs(when - now) > self.spec.max_skew_s:
                self.skewed += 1
                if self.skewed == 1:
                    self.say(f"iiotfl gateway: a {self.spec.kind} timestamp is {when - now:+.0f} s off this "
                             f"gateway's clock (max_skew_s {self.spec.max_skew_s:g}); such records get their arrival "
                             "time, counted as 'skewed' in the status")
                when = now
            key = self.spec.row_key
            if key is None:
                self._pending.append((now, when, mapped))
            else:
                self._held.update(mapped)
                if key in mapped and mapped[key] != self._last_key:
                    self._last_key = mapped[key]
                    self._pending.append((now, when, dict(self._held)))
            due = len(self._pending) >= BATCH or now - self._flushed >= self.spec.flush_s
        if due:
            self.flush()

    def malformed(self, kind: str, detail: str) -> None:
        with self._lock:
            n = self.malformed_counts[kind] = self.malformed_counts.get(kind, 0) + 1
        if n == 1:
            self.say(f"iiotfl gateway: malformed {kind} from the {self.spec.kind} source: {detail}; skipped, counted "
                     "in the status (further ones are not logged)")

    def connected(self, up: bool, detail: str = "") -> None:
        changed = up != self.up
        self.up, self.detail = up, detail
        if changed or not up:
            self.say(f"iiotfl gateway: {self.spec.kind} source {'connected' if up else 'not connected'}"
                     f"{': ' + detail if detail else ''}")
        self.write_status()

    # -- batching and status -------------------------------------------------------------------
    def flush(self) -> int:
        with self._lock:
            batch, self._pending = self._pending, []
            self._flushed = self.clock()
        if batch:
            try:
                self.store.append(batch)
            except Exception:
                with self._lock:  # kept for the next flush: a full disk must not lose what arrived
                    self._pending[:0] = batch
                raise
            with self._lock:
                self.recorded += len(batch)
        return len(batch)

    def status(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            ages = {c: now - self.seen[c] if c in self.seen else None for c in self.spec.columns}
            stale = sorted(c for c, age in ages.items()
                           if (age if age is not None else now - self._started) > self.spec.stale_after_s)
            status = {"time": now, "source": self.spec.kind, "connected": self.up, "detail": self.detail,
                      "received": self.received, "recorded": self.recorded, "stored": None,
                      "dropped_by_bounds": self.store.dropped, "malformed": dict(self.malformed_counts),
                      "skewed": self.skewed, "stale": stale,
                      "last_update_s": {c: None if a is None else round(a, 3) for c, a in ages.items()}}
        for column in sorted(set(stale) - self._stale):
            name = next(s.name for s in self.spec.signals if s.column == column)
            self.say(f"iiotfl gateway: signal {name!r} ({column}) has not updated for {self.spec.stale_after_s:g} s; "
                     "flagged stale in the status")
        for column in sorted(self._stale - set(stale)):
            self.say(f"iiotfl gateway: signal {column} updates again")
        self._stale = set(stale)
        return status

    def status_path(self) -> Path:
        assert self.spec.store_path is not None, "live sources have a store"
        return self.spec.store_path.with_name(self.spec.store_path.stem + ".status.json")

    def write_status(self) -> dict[str, Any]:
        with self._status_lock:  # the intake's thread and the source's (connected()) both write it
            status = self.status()
            status["stored"] = self.store.count()
            path = self.status_path()
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(status, indent=1))
            tmp.replace(path)  # readers never see half a file
        return status

    def start(self) -> "Intake":
        """Flush and write the status in the background until :meth:`stop`."""
        def loop() -> None:
            last, failing = 0.0, ""
            while not self._stop.wait(max(self.spec.flush_s, 0.05)):
                try:
                    self.flush()
                    if self.clock() - last >= STATUS_EVERY_S:
                        last = self.clock()
                        self.write_status()
                    failing = ""
                except Exception as err:  # noqa: BLE001 - a full disk: say so once, keep the records, try again
                    if f"{type(err).__name__}: {err}" != failing:
                        failing = f"{type(err).__name__}: {err}"
                        self.say(f"iiotfl gateway: the local store {self.spec.store_path} cannot be written "
                                 f"({failing}); records are kept in memory and written when it can")

        self._thread = threading.Thread(target=loop, name="intake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()
        self.write_status()
