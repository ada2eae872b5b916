"""One OS process's wiring: the actors placed in it, the links between them and to other processes."""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Mapping

import zmq

from graphflow.graph.model import Graph, Node
from graphflow.runtime.actor import Actor
from graphflow.runtime.ledger import Ledger
from graphflow.runtime.links import Inbox, LocalLink, ZmqLink, ZmqPump, ack_path
from graphflow.runtime.shm import ShmContext, SlotPool


class EngineProcess:
    """The actors of one OS process, their channels, and the stop/stats plumbing for them."""

    def __init__(self, graph: Graph, host_of: dict[str, str], name: str, rundir: str,
                 report: Callable[[str, str], None], services: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.stop = threading.Event()
        self.go = threading.Event()
        self.closing = threading.Event()
        self.ctx = zmq.Context.instance()
        self.shm = ShmContext(name, rundir, list(host_of.values()))
        mine = [n for n in graph.nodes.values() if host_of[n.id] == name]
        self.ledger = Ledger(rundir, name, len(graph.edges), len(graph.nodes))
        position = {eid: k for k, eid in enumerate(graph.nodes)}
        endpoints = {i: f"ipc://{rundir}/e{i}" for i in range(len(graph.edges))}
        self.inbound: dict[str, list[str]] = {}  # process → acknowledgements of its inputs from other processes
        for i, e in enumerate(graph.edges):
            if host_of[e.src] != host_of[e.dst]:
                self.inbound.setdefault(host_of[e.dst], []).append(ack_path(endpoints[i]))
        inboxes: dict[str, Inbox] = {}
        self.pumps: list[ZmqPump] = []
        for node in mine:
            incoming = [(i, e) for i, e in enumerate(graph.edges) if e.dst == node.id]
            if not incoming:
                continue
            inbox = Inbox([(e.dst_port, e.policy, e.capacity) for _, e in incoming])
            inbox.counts = self.ledger.engine(position[node.id])
            inboxes[node.id] = inbox
            remote = {k: endpoints[i] for k, (i, e) in enumerate(incoming) if host_of[e.src] != name}
            cells = {k: self.ledger.edge(i) for k, (i, e) in enumerate(incoming) if host_of[e.src] != name}
            self.pumps.append(ZmqPump(self.ctx, inbox, remote, self.shm, cells))
        self.actors: list[Actor] = []
        for node in mine:
            outlets: dict[str, list[Any]] = {p: [] for p in node.cls.outputs}
            for i, e in enumerate(graph.edges):
                if e.src != node.id:
                    continue
                fanout = sum(1 for x in graph.edges if x.src == e.src and x.src_port == e.src_port)
                if host_of[e.dst] == name:
                    index = [j for j, x in enumerate(graph.edges) if x.dst == e.dst].index(i)
                    outlets[e.src_port].append(LocalLink(inboxes[e.dst], index, isolate=fanout > 1))
                else:
                    link = ZmqLink(self.ctx, endpoints[i], self.shm, host_of[e.dst], e.policy,
                                   graph.settings.get("shutdown_timeout", 10.0) / 2)
                    link.counts = self.ledger.edge(i)
                    outlets[e.src_port].append(link)
            actor = Actor(node, inboxes.get(node.id), outlets, report, self.stop, self.go,
                          self._pools(graph, host_of, node), self.closing, services)
            actor.end_sources = [upstream_sources(graph, e.src) for e in graph.edges if e.dst == node.id]
            self.actors.append(actor)

    def _pools(self, graph: Graph, host_of: dict[str, str], node: Node) -> dict[str, tuple[SlotPool, float | None]]:
        """A shared-memory pool for each output port of `node` with consumers in other processes."""
        pools = {}
        for port in node.cls.outputs:
            remote = [e for e in graph.edges if e.src == node.id and e.src_port == port and host_of[e.dst] != self.name]
            if remote:
                slots = max(e.slots or 2 * e.capacity + 8 for e in remote)
                lossless = any(e.policy == "block" for e in remote)  # else never wait: drop instead
                pools[port] = (self.shm.pool(f"{node.id}.{port}", slots), None if lossless else 0.0)
        return pools

    def start(self) -> None:
        for pump in self.pumps:
            pump.start()
        for actor in self.actors:
            actor.thread.start()

    def request_stop(self) -> None:
        """Drain: sources stop producing and send end-of-stream; the rest finishes what it holds."""
        for actor in self.actors:
            if actor.node.cls.is_source():
                actor.context.stopping.set()

    def ready(self) -> bool:
        """Every actor has finished (or failed) setup."""
        return all(a.ready.is_set() or not a.thread.is_alive() for a in self.actors)

    def alive(self) -> bool:
        return any(a.thread.is_alive() for a in self.actors)

    def delivered(self) -> bool:
        """Whether this process, its engines done, may close its links and pools: every consumer in another
        process acknowledged end-of-stream on each edge from here, and every process still holding a frame of
        its pools has received all it ever will (so it mapped them); consumers that are gone do not count."""
        links = [link for a in self.actors for ls in a.outlets.values() for link in ls if isinstance(link, ZmqLink)]
        if not all(link.delivered() for link in links):
            return False
        holders = set().union(*(pool.holders() for pool in self.shm.pools.values())) - {self.name}
        return all(all(map(os.path.exists, self.inbound.get(h, ()))) or not self.shm.host_alive(h) for h in holders)

    def close(self) -> None:
        self.closing.set()
        for actor in self.actors:
            actor.context.stopping.set()
            if actor.inbox is not None:
                actor.inbox.close()
        for actor in self.actors:
            actor.thread.join(2)
        for pump in self.pumps:
            pump.close()
        for actor in self.actors:
            for links in actor.outlets.values():
                for link in links:
                    link.close()
        self.shm.close()

    def snapshot(self) -> list[dict[str, Any]]:
        return [a.snapshot() for a in self.actors]

    def command(self, engine: str, op: str, args: dict[str, Any]) -> Any:
        """Run a launcher command on one of this process's engines."""
        for actor in self.actors:
            if actor.node.id == engine:
                return actor.command(op, args)
        raise KeyError(engine)


def upstream_sources(graph: Graph, engine: str) -> frozenset[str]:
    """The source engines whose messages reach `engine` (itself included, if it is one)."""
    import networkx as nx

    g = graph.nx()
    return frozenset(n for n in nx.ancestors(g, engine) | {engine} if graph.nodes[n].cls.is_source())
