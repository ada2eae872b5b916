"""The service's state on disk: tasks added through the API, streams (each bound to its task), their rules and
recent events in one SQLite file.

A restart of `graphflow serve` reads the tasks, streams and rules back and starts them again; events are kept for a
bounded time and count, so `GET /events` still answers after a restart. SQLite in WAL mode: the HTTP side reads
while the event writer appends, and a crash loses at most the last uncommitted batch of events.

One service owns a state file: an exclusive lock on `FILE.lock` beside it is taken at open and held until close.
A file that cannot be opened, read or locked is a GraphflowError (one line); a change that cannot be saved is a
StateError, raised before anything else of that change happened."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from graphflow.errors import GraphflowError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (id TEXT PRIMARY KEY, spec TEXT NOT NULL, rules TEXT, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (n INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, stream TEXT NOT NULL,
                                   kind TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_stream_ts ON events (stream, ts);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, graph TEXT NOT NULL, labels TEXT, added REAL NOT NULL);
"""
# columns added since the first schema: (table, column, declaration), added to an older state file when opened
MIGRATIONS = (("events", "task", "TEXT"), ("events", "eid", "TEXT"))
INDEXES = "CREATE INDEX IF NOT EXISTS events_eid ON events (eid);"  # on migrated columns, made after them


class StateError(Exception):
    """A change to the state file failed (disk full, file gone read-only): nothing of that change was saved."""


class Store:
    """Streams, rules and events of one service; safe to use from several threads."""

    def __init__(self, path: str | Path, keep_events_s: float = 7 * 86400, keep_events: int = 100_000) -> None:
        self.path = str(path)
        self.keep_events_s, self.keep_events = keep_events_s, keep_events
        self._lock = threading.Lock()
        self._owner = _take_lock(self.path) if self.path != ":memory:" else None  # a memory store is nobody else's
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._migrate()
            self._db.executescript(INDEXES)
            bad = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if bad != "ok":
                raise sqlite3.DatabaseError(bad)
            self._db.execute("SELECT id, spec, rules FROM streams").fetchall()
        except sqlite3.Error as exc:
            self._release()
            raise GraphflowError(f"{self.path}: cannot use the state file ({' '.join(str(exc).split())}); "
                                 "move it away to start with no streams") from None
        self._added_since_prune = 0

    def _migrate(self) -> None:
        for table, column, declaration in MIGRATIONS:
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._release()

    def _release(self) -> None:
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None

    def _change(self, sql: str, args: tuple[Any, ...]) -> int:
        """Run one change in its own transaction; the rows it touched, or StateError when it could not be saved."""
        with self._lock:
            try:
                return self._db.execute(sql, args).rowcount
            except sqlite3.Error as exc:
                raise StateError(f"state file {self.path}: the change was not saved, nothing applied "
                                 f"({' '.join(str(exc).split())})") from None

    # streams and their rules -----------------------------------------------------------------------------
    def put_stream(self, spec: dict[str, Any]) -> None:
        self._change("INSERT OR REPLACE INTO streams (id, spec, rules, added) VALUES (?, ?, "
                     "(SELECT rules FROM streams WHERE id = ?), ?)",
                     (spec["id"], json.dumps(spec), spec["id"], time.time()))

    def delete_stream(self, stream: str) -> bool:
        return self._change("DELETE FROM streams WHERE id = ?", (stream,)) > 0

    def streams(self) -> list[dict[str, Any]]:
        """Every stored stream as {"spec", "rules"} in the order they were added; a row that does not decode is
        reported (one line) and left out."""
        with self._lock:
            rows = self._db.execute("SELECT id, spec, rules FROM streams ORDER BY added, id").fetchall()
        out = []
        for stream, spec, rules in rows:
            try:
                row = {"spec": json.loads(spec), "rules": None if rules is None else json.loads(rules)}
            except (TypeError, ValueError) as exc:
                log.error("%s: stream %r not restored: its row does not decode (%s)", self.path, stream, exc)
                continue
            if not isinstance(row["spec"], dict) or not isinstance(row["rules"], (list, type(None))):
                log.error("%s: stream %r not restored: its row holds no stream object and rule list",
                          self.path, stream)
                continue
            out.append(row)
        return out

    def set_rules(self, stream: str, rules: list[dict[str, Any]] | None) -> bool:
        return self._change("UPDATE streams SET rules = ? WHERE id = ?",
                            (None if rules is None else json.dumps(rules), stream)) > 0

    # tasks -----------------------------------------------------------------------------------------------
    def put_task(self, task: str, graph: dict[str, Any], labels: dict[str, Any]) -> None:
        self._change("INSERT OR REPLACE INTO tasks (id, graph, labels, added) VALUES (?, ?, ?, "
                     "COALESCE((SELECT added FROM tasks WHERE id = ?), ?))",
                     (task, json.dumps(graph), json.dumps(labels), task, time.time()))

    def delete_task(self, task: str) -> bool:
        return self._change("DELETE FROM tasks WHERE id = ?", (task,)) > 0

    def tasks(self) -> list[dict[str, Any]]:
        """Every stored task as {"id", "graph", "labels"} in the order they were added."""
        with self._lock:
            rows = self._db.execute("SELECT id, graph, labels FROM tasks ORDER BY added, id").fetchall()
        return [{"id": i, "graph": json.loads(g), "labels": json.loads(lab) if lab else {}} for i, g, lab in rows]

    # events ----------------------------------------------------------------------------------------------
    def add_events(self, events: list[tuple[float, str, str, dict[str, Any], str]]) -> None:
        """Append (ts, stream, kind, body, task) rows in one transaction; prunes by age and count now and then."""
        if not events:
            return
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    self._db.executemany(
                        "INSERT INTO events (ts, stream, kind, body, task, eid) VALUES (?, ?, ?, ?, ?, ?)",
                        [(ts, s, k, json.dumps(b, default=str), t, b.get("id")) for ts, s, k, b, t in events])
                    self._db.execute("COMMIT")
                finally:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                self._added_since_prune += len(events)
                if self._added_since_prune >= 1000:
                    self._prune()
            except sqlite3.Error as exc:
                raise StateError(f"state file {self.path}: {len(events)} events not saved "
                                 f"({' '.join(str(exc).split())})") from None

    def _prune(self) -> None:
        self._added_since_prune = 0
        self._db.execute("DELETE FROM events WHERE ts < ?", (time.time() - self.keep_events_s,))
        self._db.execute("DELETE FROM events WHERE n <= (SELECT MAX(n) FROM events) - ?", (self.keep_events,))

    def event(self, eid: str) -> dict[str, Any] | None:
        """The event whose body has this `id`, or None."""
        with self._lock:
            row = self._db.execute("SELECT n, ts, stream, kind, body, task FROM events WHERE eid = ?", (eid,)).fetchone()
        if row is None:
            return None
        n, ts, s, k, body, t = row
        return {"n": n, "ts": ts, "stream": s, "task": t, "kind": k, "event": json.loads(body)}

    def events(self, stream: str | None = None, kind: str | None = None, since: float | None = None,
               limit: int = 100, task: str | None = None) -> list[dict[str, Any]]:
        """The newest events first, filtered by stream, kind, time (epoch seconds) and task."""
        where, args = [], []
        for clause, value in (("stream = ?", stream), ("kind = ?", kind), ("ts >= ?", since), ("task = ?", task)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = "SELECT n, ts, stream, kind, body, task FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY n DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [{"n": n, "ts": ts, "stream": s, "task": t, "kind": k, "event": json.loads(body)}
                for n, ts, s, k, body, t in rows]


def _take_lock(path: str) -> int:
    """The descriptor of `path`.lock, exclusively locked; GraphflowError when another process holds it."""
    lock = f"{path}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise GraphflowError(f"{path}: cannot create the lock file {lock} ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise GraphflowError(f"{path}: the state file is in use by another graphflow serve (it holds {lock})") from None
    return fd
