"""What a loaded graph is: its nodes, edges and settings, and the schema of each part of a graph file."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

import graphflow.graph.fields as fields
from graphflow.engine import Engine, Param
from graphflow.runtime.queues import DROP_POLICIES

PLACEMENTS = ("thread", "process")


GROUP = re.compile(r"process:[A-Za-z0-9_.-]{1,64}")  # engines naming one group share one child process


ENGINE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # used in file names and log names; '.' separates engine and port


ON_ERROR = ("skip", "stop")


RESTART = ("never", "on-failure")


MAX_DIGITS = 30  # longer integers in a graph file are a mistake (and slow to parse)


MAX_QUEUE = 10_000  # messages queued on one connection; frame slots per connection


TOP = fields.schema(
    name=Param(str, "", doc="graph name (default: the file name without .json)"),
    description=Param(str, "", doc="free text for people"),
    engines=Param(dict, {}, doc="engine id → engine"),
    connections=Param(list, [], doc='["a.out", "b.in"] or {"from", "to", ...}'),
    settings=Param(dict, {}, doc="run settings"))


SETTINGS = fields.schema(
    queue_capacity=Param(int, 8, ge=1, le=MAX_QUEUE, doc="default capacity of a connection, in messages"),
    shutdown_timeout=Param(float, 10.0, ge=0.1, le=3600.0, doc="seconds engines get to drain and stop"),
    stats_interval=Param(float, 0.5, ge=0.01, le=3600.0, doc="seconds between statistics reports"),
    restart_window=Param(float, 60.0, ge=0.0, le=86400.0,
                         doc="seconds without a death after which an engine's max_restarts budget is whole again"),
    watchdog_s=Param(float, 30.0, ge=0.0, le=86400.0,
                     doc="report an engine holding one message, or a process silent, longer than this (0: off)"))


NODE = fields.schema(
    type=Param(str, doc="built-in engine name or package.module:Class"),
    placement=Param(str, "thread", doc="thread, process or process:NAME"),
    params=Param(dict, {}, doc="the engine's params"),
    on_error=Param(str, "skip", choices=ON_ERROR, doc="an error in process(): skip the message or stop"),
    restart=Param(str, "never", choices=RESTART, doc="restart a process engine that dies"),
    max_restarts=Param(int, 3, ge=0, le=1000, doc="restarts before the engine is given up"),
    max_rss_mb=Param(int, 0, ge=0, le=10_000_000,
                     doc="a process engine using more memory (MB) is killed and reported (0: no limit)"))


EDGE = fields.schema(**{
    "from": Param(str, doc="engine.port sending"),
    "to": Param(str, doc="engine.port receiving"),
    "policy": Param(str, "block", choices=DROP_POLICIES, doc="what a full queue does"),
    "capacity": Param(int, 8, ge=1, le=MAX_QUEUE, doc="messages queued (default: queue_capacity)"),
    "feedback": Param(bool, False, doc="an intended cycle"),
    "slots": Param(int, 0, ge=0, le=MAX_QUEUE, doc="shared-memory frame slots (0: 2 × capacity + 8)")})


@dataclass
class Node:
    """One engine of the graph, as declared."""

    id: str
    type: str
    cls: type[Engine]
    params: dict[str, Any]
    placement: str = "thread"  # "thread", "process" (a process of its own) or "process:GROUP" (shared)
    on_error: str = "skip"
    restart: str = "never"
    max_restarts: int = 3
    max_rss_mb: int = 0


@dataclass
class Edge:
    """A connection from one output port to one input port, with its queue policy."""

    src: str
    src_port: str
    dst: str
    dst_port: str
    policy: str = "block"
    capacity: int = 8
    feedback: bool = False
    slots: int = 0  # shared-memory frame slots when it crosses processes (0: 2 × capacity + 8)

    @property
    def name(self) -> str:
        return f"{self.src}.{self.src_port}->{self.dst}.{self.dst_port}"


@dataclass
class Graph:
    """A validated graph, ready to run."""

    name: str
    file: str
    nodes: dict[str, Node]
    edges: list[Edge]
    settings: dict[str, Any] = field(default_factory=dict)

    def nx(self) -> nx.MultiDiGraph:
        """The graph as networkx: node attrs type/placement/params, edge attrs ports/policy."""
        g = nx.MultiDiGraph(name=self.name)
        for n in self.nodes.values():
            g.add_node(n.id, type=n.type, placement=n.placement, params=n.params, cls=n.cls)
        for e in self.edges:
            g.add_edge(e.src, e.dst, src_port=e.src_port, dst_port=e.dst_port, policy=e.policy,
                       capacity=e.capacity, feedback=e.feedback)
        return g

    def sources(self) -> list[str]:
        return [n.id for n in self.nodes.values() if n.cls.is_source()]
