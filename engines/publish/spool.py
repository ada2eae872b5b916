"""Queues of items waiting for delivery to a broker: in memory, or on disk (a spool) so they survive a crash or a
restart. Both are bounded: the oldest waiting items are dropped and counted, never those a sender holds (taken,
not yet done), so what was sent, dropped and still pending always adds up to what was put."""
from __future__ import annotations

import sqlite3
import threading
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import msgpack


class Outbox(Protocol):
    """What a sender needs from a queue of pending items."""

    def put(self, items: list[Any]) -> int:
        """Append `items`; return how many of the oldest were dropped to stay within the bound."""

    def take(self, limit: int) -> list[tuple[int, Any]]:
        """Up to `limit` oldest items with their keys, held (not dropped) until `done`."""

    def done(self, key: int | None) -> None:
        """Remove the taken items up to and including `key` (delivered; None = none) and release the rest."""

    def __len__(self) -> int: ...

    def close(self) -> None: ...


class MemoryQueue:
    """Items waiting in memory, at most `bound` of them; what is left at exit is lost."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.items: deque[tuple[int, Any]] = deque()
        self.next_key = 0
        self.held = 0  # items at the left that a sender took
        self.lock = threading.Lock()

    def put(self, items: list[Any]) -> int:
        dropped = 0
        with self.lock:
            for item in items:
                if len(self.items) - self.held >= self.bound:
                    del self.items[self.held]
                    dropped += 1
                self.items.append((self.next_key, item))
                self.next_key += 1
        return dropped

    def take(self, limit: int) -> list[tuple[int, Any]]:
        with self.lock:
            batch = list(islice(self.items, limit))
            self.held = len(batch)
            return batch

    def done(self, key: int | None) -> None:
        with self.lock:
            while key is not None and self.items and self.items[0][0] <= key:
                self.items.popleft()
            self.held = 0

    def __len__(self) -> int:
        return len(self.items)

    def close(self) -> None:
        """Nothing to release."""


class Spool:
    """Items waiting in one SQLite file (msgpack-encoded), at most `max_bytes` of them: written before `put`
    returns, so a crash or a stop loses nothing that was put; the next Spool on the same file sends them."""

    def __init__(self, path: str | Path, max_bytes: int) -> None:
        self.path, self.max_bytes = Path(path), max_bytes
        self.held = -1  # the last key a sender took
        self.lock = threading.Lock()
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")    # a crashed writer loses no committed item
            self.db.execute("PRAGMA synchronous=NORMAL")   # no fsync per item: survives a process crash, not power loss
            self.db.execute("CREATE TABLE IF NOT EXISTS items "
                            "(key INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)")
            self.db.commit()
            self.count, self.bytes = self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM items").fetchone()
        except sqlite3.Error as exc:
            raise OSError(f"spool {self.path}: {exc}") from None

    def put(self, items: list[Any]) -> int:
        bodies = [msgpack.packb(item, use_bin_type=True) for item in items]
        if not bodies:
            return 0
        with self.lock, self.db:
            self.db.executemany("INSERT INTO items (body) VALUES (?)", [(b,) for b in bodies])
            self.count += len(bodies)
            self.bytes += sum(len(b) for b in bodies)
            return self._trim()

    def _trim(self) -> int:
        """Drop the oldest items until the spool fits in `max_bytes`; return how many were dropped."""
        if self.bytes <= self.max_bytes:
            return 0
        dropped, freed, last = 0, 0, None
        for key, size in self.db.execute("SELECT key, LENGTH(body) FROM items WHERE key > ? ORDER BY key",
                                         (self.held,)):
            dropped, freed, last = dropped + 1, freed + size, key
            if self.bytes - freed <= self.max_bytes:
                break
        if last is not None:
            self.db.execute("DELETE FROM items WHERE key > ? AND key <= ?", (self.held, last))
        self.count -= dropped
        self.bytes -= freed
        return dropped

    def take(self, limit: int) -> list[tuple[int, Any]]:
        with self.lock:
            rows = self.db.execute("SELECT key, body FROM items ORDER BY key LIMIT ?", (limit,)).fetchall()
            if rows:
                self.held = rows[-1][0]
        return [(key, msgpack.unpackb(body, raw=False)) for key, body in rows]

    def done(self, key: int | None) -> None:
        with self.lock, self.db:
            if key is not None:
                n, size = self.db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM items WHERE key <= ?",
                                          (key,)).fetchone()
                self.db.execute("DELETE FROM items WHERE key <= ?", (key,))
                self.count -= n
                self.bytes -= size
            self.held = -1

    def __len__(self) -> int:
        return self.count

    def close(self) -> None:
        with self.lock:
            self.db.close()
