"""`graphflow serve`'s process: prepares the graph, starts the runtime, the controller and the HTTP server."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from graphflow.errors import GraphflowError
from graphflow.runtime.summary import Summary
from graphflow.serve.controller import Service
from graphflow.serve.store import Store
from graphflow.serve.streams import is_loopback
from graphflow.serve.tap import TAP


# command line -----------------------------------------------------------------------------------------------------
def prepare_graph(graph_doc: dict[str, Any]) -> tuple[str, str | None, str]:
    """The service's view of a graph document: (source engine, rule engine or None, engine the tap listens to).
    Adds the tap engine and its connection to `graph_doc`; the source engine waits for streams instead of
    reading the ones in the file (they are ignored: streams come through the API)."""
    engines = graph_doc.get("engines") or {}
    sources = [eid for eid, e in engines.items() if isinstance(e, dict) and e.get("type") == "decode"]
    if len(sources) != 1:
        raise GraphflowError(f"graphflow serve needs exactly one 'decode' engine (found {len(sources)})")
    rules = [eid for eid, e in engines.items() if isinstance(e, dict) and e.get("type") == "rule"]
    src = sources[0]
    params = engines[src].setdefault("params", {})
    params["sources"] = []
    params["wait_for_sources"] = True
    listen = rules[0] if rules else src
    engines[TAP] = {"type": "graphflow.serve.tap:Tap"}
    connections = graph_doc.setdefault("connections", [])
    if isinstance(connections, list):
        connections[:] = [live_edge(c, src) for c in connections]
    connections.append([f"{listen}.out", f"{TAP}.in"])
    return src, (rules[0] if rules else None), listen


LIVE_POLICY = "drop_oldest"  # connections out of a service's source, unless the graph gives a policy


def live_edge(connection: Any, source: str) -> Any:
    """A connection out of the service's source engine with no policy of its own, made LIVE_POLICY: cameras do not
    wait, so a graph that cannot keep up drops each stream's oldest frames (counted) instead of falling ever further
    behind. Anything else is left as it is (the loader checks it)."""
    edge = connection
    if isinstance(connection, list) and len(connection) == 2:
        edge = {"from": connection[0], "to": connection[1]}
    if isinstance(edge, dict) and isinstance(edge.get("from"), str) \
            and edge["from"].partition(".")[0] == source and "policy" not in edge:
        return {**edge, "policy": LIVE_POLICY}
    return connection


MALLOC_ARENAS = 2  # a long-lived service's malloc arenas (see graphflow.runtime.memory.limit_arenas), unless set already


def few_malloc_arenas() -> None:
    """Before any of the service's threads start: at most MALLOC_ARENAS malloc arenas in this process and in the
    engine processes it starts (through the environment), so memory freed as cameras come and go is reused
    instead of spread over an arena per thread. A MALLOC_ARENA_MAX the user set is kept."""
    from graphflow.runtime.memory import limit_arenas

    count = os.environ.setdefault("MALLOC_ARENA_MAX", str(MALLOC_ARENAS))
    if count.isdigit() and int(count) > 0:
        limit_arenas(int(count))


def serve(graph_path: str, host: str = "127.0.0.1", port: int = 8080, state: str = "graphflow.db",
          token: str | None = None, media: list[str] | None = None, overrides: dict | None = None,
          ray: str | None = None, stats: str | None = None) -> int:
    """Run the service until SIGINT/SIGTERM; returns the exit code, and with `stats` writes the run's summary there
    as `launch --stats` does. With `ray` (`auto` or a cluster address) the graph runs as one replica per node of
    that Ray cluster (graphflow.cluster), behind the same API."""
    import json as json_mod

    try:
        import uvicorn
    except ImportError:
        raise GraphflowError("graphflow serve needs the service extra: pip install 'graphflow[serve]'") from None
    from graphflow import graph as graph_mod
    from graphflow.serve.api import create_app

    if not is_loopback(host) and not token:
        raise GraphflowError(f"serve: listening on {host} needs a token (--token or GRAPHFLOW_TOKEN)")
    path = Path(graph_path)
    try:
        doc = json_mod.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GraphflowError(f"{graph_path}: cannot read the graph ({exc})") from None
    if not isinstance(doc, dict):
        raise GraphflowError(f"{graph_path}: a graph file holds a JSON object")
    source, rule, _ = prepare_graph(doc)
    g = graph_mod.build(doc, str(path), overrides or {})
    roots = [Path(m) for m in (media or [str(path.resolve().parent)])]
    few_malloc_arenas()
    store = Store(state)
    if ray:
        from graphflow.cluster.front import ClusterController

        service: Any = ClusterController(g, doc, str(path), overrides or {}, store, source, rule, roots, ray)
    else:
        service = Service(g, store, source, rule, roots)
    service.start()
    # open MJPEG and event streams must not hold a stop for long
    config = uvicorn.Config(create_app(service, token), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    print(f"graphflow serve: http://{host}:{port}/ (state {state}, media roots: "
          f"{', '.join(str(r) for r in service.media_roots)})", flush=True)
    def stop_serving(signum: int, _frame: Any) -> None:
        # uvicorn takes SIGINT/SIGTERM while it serves and raises them again once it stopped: with these handlers
        # in place that second time lands here, and the graph is drained below instead of the process dying
        server.should_exit = True

    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_serving)
    try:
        server.run()
    finally:
        service.stop()
        store.close()
    summary = service.summary
    if stats and isinstance(summary, Summary):  # (a cluster's summary is its exit code only)
        Path(stats).write_text(json_mod.dumps(summary.document(g), indent=1, default=str))
    return summary.exit_code if summary is not None else 1
