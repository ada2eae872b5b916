"""The runtime: the data plane (actors, links, shared memory, per-stream queues), one process's wiring and a child
process's main, and the launcher with its supervisor (the control plane)."""
from graphflow.runtime.launcher import Launcher, hosts, run
from graphflow.runtime.summary import Summary
from graphflow.runtime.supervise import MAIN

__all__ = ["MAIN", "Launcher", "Summary", "hosts", "run"]
