"""How a run ended: the Summary with its exit code, and the Graveyard that stands in for dead engines."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import zmq

from graphflow.graph.model import Graph, Node
from graphflow.message import EOS, unpack
from graphflow.runtime.links import encode

OUTCOMES = {0: "clean", 1: "FAILED", 3: "finished with errors or losses"}  # exit code → its word


@dataclass
class Summary:
    """What a run did: per-engine stats, errors, losses, wall time and how it ended. Its exit code:
    0 clean: the sources ended (or a stop signal drained the graph), no engine reported an error, nothing was
      lost (a drop policy's drops are by design, not losses);
    1 failed: an engine is gone for good, a setup failed, or the stop had to be forced or timed out;
    3 finished, not clean: engines reported errors or messages were lost (`lost`, by reason).
    (2 is the command line's: a usage or validation error.)"""

    stats: dict[str, dict[str, Any]]
    errors: list[str]  # the first and the last texts (bounded), with a line counting those between
    wall_s: float
    stopped_by: str = ""
    failed: bool = False
    lost: int = 0
    lost_reasons: dict[str, int] = field(default_factory=dict)  # "engine: reason" → messages
    errors_by_engine: dict[str, int] = field(default_factory=dict)  # engines with errors (deaths included)

    @property
    def exit_code(self) -> int:
        if self.failed:
            return 1
        return 3 if self.lost or any(self.errors_by_engine.values()) else 0

    def document(self, graph: Graph) -> dict[str, Any]:
        """Everything the run reported, for `--stats FILE`: every field, the exit code and its meaning."""
        doc: dict[str, Any] = {"graph": graph.name, "file": graph.file, "exit_code": self.exit_code,
                               "outcome": OUTCOMES.get(self.exit_code, "")}
        doc.update({f.name: getattr(self, f.name) for f in fields(self)})
        doc["engines"] = doc.pop("stats")
        return doc


class Graveyard:
    """Stands in for process engines that died for good: their consumers get end-of-stream so the rest of
    the graph can finish, and what their producers still send them is received and discarded (counted),
    so no producer blocks on a dead consumer; their shared-memory holds are reclaimed by the owners."""

    def __init__(self, graph: Graph, host_of: dict[str, str], rundir: str, ctx: zmq.Context) -> None:
        self.graph, self.host_of, self.rundir, self.ctx = graph, host_of, rundir, ctx
        self.socks: list[tuple[zmq.Socket, str, int]] = []  # (socket, engine whose inputs it discards or "", edge)
        self.discarded: dict[str, int] = {}
        self.arrived: dict[int, int] = {}  # per connection, messages received and discarded here

    def bury(self, node: Node) -> None:
        host = self.host_of[node.id]
        for i, e in enumerate(self.graph.edges):
            if self.host_of[e.src] == self.host_of[e.dst] == host:
                continue  # both ends died together: an in-process link, no socket
            if e.src == node.id:
                self.end(i)
            if e.dst == node.id:
                pull = self.ctx.socket(zmq.PULL)
                pull.setsockopt(zmq.LINGER, 0)
                pull.bind(f"ipc://{self.rundir}/e{i}")
                self.socks.append((pull, node.id, i))
        self.discarded.setdefault(node.id, 0)

    def end(self, edge: int) -> None:
        """Send end-of-stream on a cross-process edge on behalf of its producer: one that died, or one that ended
        while its consumer was dead (the restarted consumer would wait for it forever)."""
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(f"ipc://{self.rundir}/e{edge}")
        push.send_multipart(encode(EOS), zmq.NOBLOCK)
        self.socks.append((push, "", edge))

    def drain(self) -> None:
        for sock, engine, edge in self.socks:
            while engine and sock.poll(0):
                head = unpack(sock.recv_multipart(copy=False)[0].buffer)
                # what the producer skipped (a drop policy, its socket full while the consumer was gone) rides on
                # the next message or end marker: those never reached the engine either
                self.discarded[engine] += sum((head.get("x") or {}).values())
                if "eos" in head or "end" in head:
                    continue  # an end marker, not a message
                self.discarded[engine] += 1
                self.arrived[edge] = self.arrived.get(edge, 0) + 1

    def close(self) -> None:
        for sock, _, _ in self.socks:
            sock.close()
