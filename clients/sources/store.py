"""The gateway's bounded local history: SQLite in WAL mode, one file on the gateway's disk.

Every record a live source delivers (``intake.Intake``) is appended in a transaction with
``synchronous=FULL``: once a batch is committed it survives the gateway's process or host going
down. A batch is committed every ``store.flush_s`` (0.2 s) or 2,000 records. The ClientApp reads
the whole history each round (:meth:`Store.table`); nothing in it leaves the gateway except what
training sends and the privacy ledger records.

Bounds, the oldest records dropped first (by arrival, the gateway's own clock):

* ``store.max_age_days``: records that arrived longer ago are deleted;
* ``store.max_mb``: the used pages of the database (its free pages are reused) are kept under
  this many MiB; over it, the oldest records are deleted down to 90 %. The write-ahead log is
  checkpointed back into the file every 1,000 pages (SQLite's default), so it stays a few MiB.

Schema: ``records(seq INTEGER PRIMARY KEY, arrived REAL, ts REAL, record TEXT)`` (``record`` a JSON
object of task column -> value) and ``meta(key, value)`` with the task the store was written for.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

TRIM_EVERY_S = 1.0


class StoreError(RuntimeError):
    """A store the gateway cannot use (another task's, unreadable): one line with the fix."""


class Store:
    """One gateway's store; safe to share between the source's threads (one connection, one lock)."""

    def __init__(self, path: str | Path, task: str, max_mb: float = 256.0, max_age_days: float | None = None,
                 clock=time.time) -> None:
        self.path = Path(path)
        self.max_bytes = int(max_mb * 2**20)
        self.max_age_s = None if max_age_days is None else float(max_age_days) * 86400.0
        self.clock = clock
        self.dropped = 0  # records deleted by the bounds since this object was made
        self._lock = threading.Lock()
        self._trimmed = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, arrived REAL NOT NULL, "
                             "ts REAL NOT NULL, record TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('task', ?)", (task,))
            self._db.commit()
            (held,) = self._db.execute("SELECT value FROM meta WHERE key='task'").fetchone()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"local store {self.path} cannot be opened ({err}); move it aside (nothing is "
                             "deleted) or set store.path to a new file") from None
        if held != task:
            raise StoreError(f"local store {self.path} holds {held} records, this gateway's data description says "
                             f"task {task}; set store.path to another file for this task")

    def append(self, records: Iterable[tuple[float, float, dict[str, Any]]]) -> int:
        """Commit (arrived, ts, record) rows durably; apply the bounds at most once a second."""
        rows = [(a, t, json.dumps(r, separators=(",", ":"))) for a, t, r in records]
        if not rows:
            return 0
        with self._lock:
            with self._db:
                self._db.executemany("INSERT INTO records (arrived, ts, record) VALUES (?, ?, ?)", rows)
            if self.clock() - self._trimmed >= TRIM_EVERY_S:
                self._trim()
        return len(rows)

    def trim(self) -> int:
        """Apply the bounds now; how many records were dropped."""
        with self._lock:
            return self._trim()

    def _trim(self) -> int:
        self._trimmed = self.clock()
        dropped = 0
        with self._db:
            if self.max_age_s is not None:
                dropped += self._db.execute("DELETE FROM records WHERE arrived < ?",
                                            (self.clock() - self.max_age_s,)).rowcount
            used = self._used_bytes()
            if used > self.max_bytes:
                (count,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
                cut = max(1, int(count * (1.0 - 0.9 * self.max_bytes / used)))
                dropped += self._db.execute(
                    "DELETE FROM records WHERE seq IN (SELECT seq FROM records ORDER BY seq LIMIT ?)", (cut,)).rowcount
        self.dropped += dropped
        return dropped

    def _used_bytes(self) -> int:
        page = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(page * (pages - free))

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def size_bytes(self) -> int:
        """The database file and its write-ahead log on disk."""
        wal = self.path.with_name(self.path.name + "-wal")
        return self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)

    def span(self) -> tuple[float | None, float | None]:
        """Arrival time of the oldest and the newest record (None when empty)."""
        with self._lock:
            lo, hi = self._db.execute("SELECT MIN(arrived), MAX(arrived) FROM records").fetchone()
        return lo, hi

    def records(self) -> list[tuple[float, float, dict[str, Any]]]:
        """Every (arrived, ts, record), oldest first."""
        with self._lock:
            return _records(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _records(db: sqlite3.Connection) -> list[tuple[float, float, dict[str, Any]]]:
    times = db.execute("SELECT arrived, ts FROM records ORDER BY seq").fetchall()
    # one JSON array decoded at once: three times faster than a json.loads per record
    (text,) = db.execute("SELECT '[' || coalesce(group_concat(record, ','), '') || ']' FROM "
                         "(SELECT record FROM records ORDER BY seq)").fetchone()
    return [(a, t, r) for (a, t), r in zip(times, json.loads(text))]


def read(path: str | Path, task: str) -> list[tuple[float, float, dict[str, Any]]]:
    """Every record of the store at ``path`` (the ClientApp's read each round): read-only, in one
    transaction, so a collector appending meanwhile is neither blocked nor seen half-way."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            with db:
                db.execute("BEGIN")
                (held,) = db.execute("SELECT value FROM meta WHERE key='task'").fetchone()
                if held != task:
                    raise StoreError(f"local store {path} holds {held} records, this gateway's data description "
                                     f"says task {task}; set store.path to another file for this task")
                return _records(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as err:
        raise StoreError(f"local store {path} cannot be read ({err}); check the file (nothing is changed)") from None
