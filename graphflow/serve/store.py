"""The service's state on disk: tasks added through the API, streams (each bound to its task), their rules and
recent events in one SQLite file.

A restart of `graphflow serve` reads the tasks, streams and rules back and starts them again; events are kept for a
bounded time and count, so `GET /events` still answers after a restart. SQLite in WAL mode: the HTTP side reads
while the event writer appends, and a crash loses at most the last uncommitted batch of events."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

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


class Store:
    """Streams, rules and events of one service; safe to use from several threads."""

    def __init__(self, path: str | Path, keep_events_s: float = 7 * 86400, keep_events: int = 100_000) -> None:
        self.path = str(path)
        self.keep_events_s, self.keep_events = keep_events_s, keep_events
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._db.executescript(INDEXES)
        self._added_since_prune = 0

    def _migrate(self) -> None:
        for table, column, declaration in MIGRATIONS:
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # streams and their rules -----------------------------------------------------------------------------
    def put_stream(self, spec: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO streams (id, spec, rules, added) VALUES (?, ?, "
                             "(SELECT rules FROM streams WHERE id = ?), ?)",
                             (spec["id"], json.dumps(spec), spec["id"], time.time()))

    def delete_stream(self, stream: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM streams WHERE id = ?", (stream,)).rowcount > 0

    def streams(self) -> list[dict[str, Any]]:
        """Every stored stream as {"spec", "rules"} in the order they were added."""
        with self._lock:
            rows = self._db.execute("SELECT spec, rules FROM streams ORDER BY added, id").fetchall()
        return [{"spec": json.loads(spec), "rules": None if rules is None else json.loads(rules)} for spec, rules in rows]

    def set_rules(self, stream: str, rules: list[dict[str, Any]] | None) -> bool:
        with self._lock:
            cur = self._db.execute("UPDATE streams SET rules = ? WHERE id = ?",
                                   (None if rules is None else json.dumps(rules), stream))
            return cur.rowcount > 0

    # tasks -----------------------------------------------------------------------------------------------
    def put_task(self, task: str, graph: dict[str, Any], labels: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO tasks (id, graph, labels, added) VALUES (?, ?, ?, "
                             "COALESCE((SELECT added FROM tasks WHERE id = ?), ?))",
                             (task, json.dumps(graph), json.dumps(labels), task, time.time()))

    def delete_task(self, task: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM tasks WHERE id = ?", (task,)).rowcount > 0

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
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO events (ts, stream, kind, body, task, eid) VALUES (?, ?, ?, ?, ?, ?)",
                                 [(ts, s, k, json.dumps(b, default=str), t, b.get("id")) for ts, s, k, b, t in events])
            self._db.execute("COMMIT")
            self._added_since_prune += len(events)
            if self._added_since_prune >= 1000:
                self._prune()

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
