"""`graphflow serve`'s process: reads the graph files (one task each), starts the controller and the HTTP server."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from graphflow.errors import GraphflowError
from graphflow.graph.restrictions import Restrictions
from graphflow.serve.controller import Service
from graphflow.serve.evidence import EvidencePolicy
from graphflow.serve.store import Store
from graphflow.serve.streams import RedactCredentials, is_loopback
from graphflow.serve.task import Task, build_task

MALLOC_ARENAS = 2  # a long-lived service's malloc arenas (see graphflow.runtime.memory.limit_arenas), unless set already


def few_malloc_arenas() -> None:
    """Before any of the service's threads start: at most MALLOC_ARENAS malloc arenas in this process and in the
    engine processes it starts (through the environment), so memory freed as cameras come and go is reused
    instead of spread over an arena per thread. A MALLOC_ARENA_MAX the user set is kept."""
    from graphflow.runtime.memory import limit_arenas

    count = os.environ.setdefault("MALLOC_ARENA_MAX", str(MALLOC_ARENAS))
    if count.isdigit() and int(count) > 0:
        limit_arenas(int(count))


def redact_logs() -> None:
    """Hide URL credentials (`rtsp://user:password@…`) in every log line of this process."""
    root = logging.getLogger()
    for handler in root.handlers or [logging.lastResort]:
        if handler is not None and not any(isinstance(f, RedactCredentials) for f in handler.filters):
            handler.addFilter(RedactCredentials())


def serve(graph_paths: list[str], host: str = "127.0.0.1", port: int = 8080, state: str = "graphflow.db",
          token: str | None = None, media: list[str] | None = None, overrides: dict | None = None,
          ray: str | None = None, tasks_dir: str | None = None, evidence: EvidencePolicy | None = EvidencePolicy(),
          evidence_dir: str | None = None, metrics_open: bool = False, allow_hosts: list[str] | None = None,
          brokers: list[str] | None = None, stats: str | None = None) -> int:
    """Run the service until SIGINT/SIGTERM; returns the exit code (and with `stats`, writes there what its tasks'
    runs reported, as `launch --stats` does). Each graph file (and each `*.json` in
    `tasks_dir`) is a task named after its file; the first is the default task of streams that name none. With
    `ray` (`auto` or a cluster address) one graph runs as one replica per node of that Ray cluster (graphflow.cluster),
    behind the same API. With `evidence` (None: off) every event gets a snapshot, a crop and a clip in `evidence_dir`
    (default: `evidence/` beside the state file). `metrics_open` leaves `/metrics` readable without the token;
    `allow_hosts` are more names a loopback service answers to (a reverse proxy's, which passes its own `Host`);
    `brokers` (HOST:PORT) are servers beyond loopback that tasks from the API may send to."""
    try:
        import uvicorn
    except ImportError:
        raise GraphflowError("graphflow serve needs the service extra: pip install 'graphflow[serve]'") from None
    from graphflow.serve import http
    from graphflow.serve.api import LOOPBACK_NAMES, create_app

    redact_logs()

    if not is_loopback(host) and not token:
        raise GraphflowError(f"serve: listening on {host} needs a token (--token or GRAPHFLOW_TOKEN)")
    files = [Path(p) for p in graph_paths] + task_files(tasks_dir)
    first = files[0] if files else Path(state)
    roots = [Path(m) for m in (media or [str(first.resolve().parent)])]
    tasks = [file_task(path, overrides or {} if i == 0 else {}) for i, path in enumerate(files)]  # --set: the first
    few_malloc_arenas()
    store = Store(state)  # locked and read through before anything starts: a bad file stops here
    outputs = Path(state).resolve().parent / "outputs"  # where tasks from the API may write
    outputs.mkdir(parents=True, exist_ok=True)
    restrictions = Restrictions(output_root=outputs, media_roots=tuple(roots), brokers=tuple(brokers or ()))
    try:
        if ray:
            if len(tasks) != 1:
                raise GraphflowError("serve --ray: give exactly one graph (tasks over a Ray cluster are not "
                                     "supported yet)")
            from graphflow.cluster.front import ClusterController

            task = tasks[0]
            service: Any = ClusterController(task.topology, task.doc, str(files[0]), overrides or {}, store,
                                             task.roles.source, task.roles.rule, roots, ray)
            service.start()
        else:
            folder = Path(evidence_dir) if evidence_dir else Path(state).resolve().parent / "evidence"
            service = Service(store, roots, restrictions=restrictions,
                              evidence=(folder, evidence) if evidence is not None else None)
            service.start(tasks)
    except BaseException:
        store.close()
        raise
    names = {host.lower(), *(h.lower() for h in allow_hosts or ())}
    hosts = LOOPBACK_NAMES | names if is_loopback(host) else None  # beyond loopback the token guards
    app = create_app(service, token, hosts=hosts, metrics_open=metrics_open)
    server = uvicorn.Server(http.config(app, host, port))
    print(f"graphflow serve: http://{host}:{port}/ (state {state}, tasks: {', '.join(t.id for t in tasks) or 'none'}; "
          f"media roots: {', '.join(str(r) for r in service.media_roots)})", flush=True)
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
    if stats and isinstance(service, Service):
        Path(stats).write_text(json.dumps(service.stats_document(), indent=1, default=str))
    return service.summary.exit_code if service.summary is not None else 1


def task_files(folder: str | None) -> list[Path]:
    """The graph files of a tasks folder (`*.json`, by name), or a one-line error naming it."""
    if folder is None:
        return []
    path = Path(folder)
    if not path.is_dir():
        raise GraphflowError(f"--tasks {folder}: not a folder")
    return sorted(path.glob("*.json"))


def file_task(path: Path, overrides: dict) -> Task:
    """A task from a graph file given on the command line (trusted like `launch`'s): named after the file."""
    import json as json_mod

    try:
        doc = json_mod.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GraphflowError(f"{path}: cannot read the graph ({exc})") from None
    return build_task(path.stem, doc, str(path), overrides, where=str(path))
