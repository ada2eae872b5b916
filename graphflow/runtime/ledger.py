"""Counts that survive a SIGKILL: per process incarnation, the messages each cross-process connection sent and
received there and those each engine took into its inbox, dropped by policy and finished. They live in a file of
the run folder mapped shared (`ledger-HOST-PID`), written as messages pass, so the launcher reads a dead
process's exact counts: what it held when it died, and what vanished on the connections to and from it."""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

EDGE_KINDS = ("sent", "arrived")  # per connection: handed to ZeroMQ by the producer; taken off the socket
ENGINE_KINDS = ("entered", "dropped", "finished")  # per engine: into its inbox; dropped there by policy; processed


class Ledger:
    """One process incarnation's counters: one int64 cell per (connection, kind) and (engine, kind), each written
    by one thread only (a link's sender, a pump, an inbox under its lock, an actor), so no update is lost."""

    def __init__(self, rundir: str, host: str, edges: int, engines: int, pid: int | None = None) -> None:
        self.path = ledger_path(rundir, host, os.getpid() if pid is None else pid)
        size = 8 * (len(EDGE_KINDS) * edges + len(ENGINE_KINDS) * engines)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, max(size, 8))
            self._map = mmap.mmap(fd, max(size, 8))
        finally:
            os.close(fd)
        cells = np.frombuffer(self._map, np.int64)
        self.edges = cells[: len(EDGE_KINDS) * edges].reshape(edges, len(EDGE_KINDS)) if edges else cells[:0]
        self.engines = cells[len(EDGE_KINDS) * edges:][: len(ENGINE_KINDS) * engines].reshape(engines, len(ENGINE_KINDS))

    def edge(self, index: int) -> np.ndarray:
        """The cells of connection `index`: [sent, arrived]."""
        return self.edges[index]

    def engine(self, index: int) -> np.ndarray:
        """The cells of engine `index` (its position in the graph's nodes): [entered, dropped, finished]."""
        return self.engines[index]


def ledger_path(rundir: str, host: str, pid: int) -> str:
    return str(Path(rundir, f"ledger-{host.replace(':', '_')}-{pid}"))


def read(path: str, edges: int, engines: int) -> tuple[np.ndarray, np.ndarray]:
    """A ledger's counts (a copy): (edges × [sent, arrived], engines × [entered, dropped, finished]); zeros when
    the file does not exist (its process died before it counted anything)."""
    cells = np.zeros(len(EDGE_KINDS) * edges + len(ENGINE_KINDS) * engines, np.int64)
    try:
        data = np.fromfile(path, np.int64)
    except OSError:
        data = cells[:0]
    cells[: min(len(data), len(cells))] = data[: len(cells)]
    return (cells[: len(EDGE_KINDS) * edges].reshape(edges, len(EDGE_KINDS)),
            cells[len(EDGE_KINDS) * edges:].reshape(engines, len(ENGINE_KINDS)))


def totals(rundir: str, edges: int, engines: int) -> tuple[np.ndarray, np.ndarray]:
    """The counts of every incarnation of every process of a run, summed."""
    edge_sum = np.zeros((edges, len(EDGE_KINDS)), np.int64)
    engine_sum = np.zeros((engines, len(ENGINE_KINDS)), np.int64)
    for path in Path(rundir).glob("ledger-*"):
        e, n = read(str(path), edges, engines)
        edge_sum += e
        engine_sum += n
    return edge_sum, engine_sum
