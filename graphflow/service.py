"""`graphflow serve`: the graph kept running while cameras come and go through a REST API.

The launcher runs the graph in a background thread; the HTTP side (graphflow.api, Starlette on uvicorn) talks to
the engines only through `Launcher.command`, the same control channel for thread and process engines. Streams
are data, not graph structure: adding one asks the source engine to open it, removing one ends it there and its
end flows through every engine downstream, which frees what it holds for that stream. A tap engine at the end
of the graph counts each stream's frames, fps and latency and hands events to the store and live subscribers.
Streams and their rules live in SQLite (graphflow.store), so a restart of the service restores the site."""
from __future__ import annotations

import bisect
import ipaddress
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .engine import Engine
from .errors import GraphflowError
from .graph import Graph
from .message import Message
from .preview import Previews, graph_png
from .store import Store
from .batching import StreamRecord

log = logging.getLogger(__name__)
TAP = "_service"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, 5.0, 10.0)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_stream_uri(spec: dict[str, Any], media_roots: list[Path]) -> None:
    """A stream's `uri` must be an rtsp:// address or a file under a media root; a file's is made absolute in
    `spec`, so a restored (or moved) stream opens the same file whatever the current folder."""
    uri = spec.get("uri")
    if not isinstance(uri, str) or not uri:
        raise GraphflowError("streams: 'uri' must be a file under a media root or an rtsp:// address")
    if "://" in uri:
        if not uri.startswith(("rtsp://", "rtsps://")):
            raise GraphflowError(f"streams.uri: scheme not allowed (rtsp:// or a file under a media root; got {uri!r})")
        return
    path = Path(uri).expanduser().resolve()
    if not any(path.is_relative_to(root) for root in media_roots):
        roots = ", ".join(map(str, media_roots)) or "none configured (--media)"
        raise GraphflowError(f"streams.uri: {uri!r} is not under a media root ({roots})")
    spec["uri"] = str(path)


def stream_id(spec: dict[str, Any]) -> str:
    """A new stream's `id`, checked (a non-empty string)."""
    stream = spec.get("id")
    if not isinstance(stream, str) or not stream:
        raise GraphflowError("streams: 'id' must be a non-empty string")
    return stream


def each_stream(ids: list[str], one: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """`one(stream)` for each of `ids`, leaving out a stream removed meanwhile (`one` raised KeyError)."""
    out = []
    for stream in ids:
        try:
            out.append(one(stream))
        except KeyError:
            pass
    return out


class LiveFeed:
    """The live event stream's subscribers: each reads its own bounded queue; one that does not read loses live
    events (the store keeps them) rather than holding up the graph."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self._queues: list[queue.Queue] = []
        self._lock = threading.Lock()

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(maxsize=self.size)
        with self._lock:
            self._queues.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._queues:
                self._queues.remove(q)

    def publish(self, items: list[dict[str, Any]]) -> None:
        """Hand `items` (one dict per event) to every subscriber."""
        with self._lock:
            queues = list(self._queues)
        for q in queues:
            for item in items:
                try:
                    q.put_nowait(item)
                except queue.Full:
                    break


class StreamMeter:
    """Frames, fps (over the last 5 s), events and capture→tap latency of one stream, as the tap sees them: the
    latency percentiles from the batching stage's StreamRecord, plus cumulative buckets for Prometheus."""

    def __init__(self) -> None:
        self.frames = 0
        self.events = 0
        self.recent: deque[float] = deque(maxlen=512)  # arrival times (monotonic)
        self.latency = StreamRecord()
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # counts per bucket for Prometheus (last: +Inf)
        self.latency_sum = 0.0

    def add(self, now: float, latency: float | None) -> None:
        self.frames += 1
        self.recent.append(now)
        if latency is not None:
            self.latency.add(latency)
            self.latency_sum += latency
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1

    def fps(self, now: float) -> float:
        window = [t for t in self.recent if now - t <= 5.0]
        if len(window) < 2:
            return 0.0
        return (len(window) - 1) / max(window[-1] - window[0], 1e-6)

    def percentiles(self) -> dict[str, float | None]:
        p50, p95 = self.latency.percentiles_ms()
        return {"p50": p50, "p95": p95}


class Tap(Engine):
    """The service's own engine at the end of the graph: per-stream counts and latency, events to the store."""

    outputs = ()

    def setup(self) -> None:
        self.service: Service = Service.current
        self.service.tap = self

    def process(self, msg: Message) -> None:
        self.service.previews.offer(msg)
        self.service.observe(msg)

    def on_stream_end(self, stream: str) -> None:
        self.service.stream_ended(stream)


class Service:
    """Implements graphflow.api.Controller over a running Launcher."""

    current: Service  # the service whose tap engine is being set up (one service per process)

    def __init__(self, graph: Graph, store: Store, source: str, rule: str | None,
                 media_roots: list[Path] | None = None, preview_fps: float = 5.0, preview_width: int = 640) -> None:
        from . import runtime

        self.topology, self.store, self.source, self.rule = graph, store, source, rule
        self.media_roots = [r.resolve() for r in (media_roots or [])]
        self.meters: dict[str, StreamMeter] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.rules_of: dict[str, list[dict[str, Any]]] = {}
        self.feed = LiveFeed()
        self.lock = threading.Lock()
        self.pending: list[tuple[float, str, str, dict[str, Any]]] = []
        Service.current = self
        self.previews = Previews(max_fps=preview_fps, max_width=preview_width)
        self.launcher = runtime.Launcher(graph)
        self.thread = threading.Thread(target=self._run, name="graph", daemon=True)
        self.summary: Any = None
        self.started = time.monotonic()

    # lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()
        self.launcher.started.wait(60)
        for row in self.store.streams():
            try:
                self._open(row["spec"], row["rules"])
            except (GraphflowError, ValueError) as exc:
                log.error("stream %r from the state file not restored: %s", row["spec"].get("id"), exc)

    def _run(self) -> None:
        try:
            self.summary = self.launcher.run()
        finally:
            self.flush_events()

    def stop(self) -> None:
        self.launcher.on_signal(15)
        self.thread.join(self.topology.settings.get("shutdown_timeout", 10.0) + 5)
        self.flush_events()
        self.previews.close()

    def graph_png(self) -> bytes:
        return graph_png(self.topology)

    # controller --------------------------------------------------------------------------------------------
    def add_stream(self, spec: dict[str, Any]) -> dict[str, Any]:
        stream = stream_id(spec)
        with self.lock:
            if stream in self.specs:
                raise FileExistsError(f"stream {stream!r} exists (DELETE it first)")
        self._check_uri(spec)
        self._open(spec, None)
        self.store.put_stream(spec)
        return self.stream(stream)

    def _check_uri(self, spec: dict[str, Any]) -> None:
        check_stream_uri(spec, self.media_roots)

    def _open(self, spec: dict[str, Any], rules: list[dict[str, Any]] | None) -> None:
        stream = spec["id"]
        self.launcher.command(self.source, "add_source", {"entry": spec})
        with self.lock:
            self.specs[stream] = spec
            self.meters[stream] = StreamMeter()
        if rules is not None and self.rule is not None:
            self.launcher.command(self.rule, "set_rules", {"stream": stream, "rules": rules})
            self.rules_of[stream] = rules

    def remove_stream(self, stream: str) -> None:
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
            del self.specs[stream]
            self.rules_of.pop(stream, None)
        self.store.delete_stream(stream)
        self.launcher.command(self.source, "remove_source", {"stream": stream})

    def stream_ended(self, stream: str) -> None:
        """Its end reached the tap: every engine upstream has freed its state for it."""
        with self.lock:
            if stream not in self.specs:
                self.meters.pop(stream, None)
                self.previews.forget(stream)

    def _state(self, stream: str) -> dict[str, Any]:
        stats = self.launcher.stats.get(self.source, {})
        return ((stats.get("metrics") or {}).get("sources") or {}).get(stream, {})

    def _drops(self, stream: str) -> int:
        """Frames of `stream` dropped on the way by a drop policy (frames thinned by its `fps` are not drops)."""
        return sum(int((s.get("dropped_streams") or {}).get(stream, 0)) for s in self.launcher.stats.values())

    def stream(self, stream: str) -> dict[str, Any]:
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
            spec, meter = self.specs[stream], self.meters.get(stream) or StreamMeter()
        src = self._state(stream)
        return {"id": stream, "uri": spec["uri"], "state": src.get("state", "connecting"),
                "frames": meter.frames, "fps": round(meter.fps(time.monotonic()), 2),
                "drops": self._drops(stream),
                "events": meter.events, "latency_ms": meter.percentiles(), "error": src.get("error", "")}

    def streams(self) -> list[dict[str, Any]]:
        with self.lock:
            ids = list(self.specs)
        return each_stream(ids, self.stream)

    def rules(self, stream: str) -> list[dict[str, Any]]:
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
            return self.rules_of.get(stream, self._graph_rules())

    def _graph_rules(self) -> list[dict[str, Any]]:
        return list(self.topology.nodes[self.rule].params.get("rules", [])) if self.rule else []

    def set_rules(self, stream: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.rule is None:
            raise GraphflowError("this graph has no rule engine")
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
        self.launcher.command(self.rule, "set_rules", {"stream": stream, "rules": rules})
        with self.lock:
            self.rules_of[stream] = rules
        self.store.set_rules(stream, rules)
        return rules

    def graph(self) -> dict[str, Any]:
        nodes = {}
        for eid, node in self.topology.nodes.items():
            if eid == TAP:
                continue
            s = self.launcher.stats.get(eid, {})
            nodes[eid] = {"type": node.type, "placement": node.placement,
                          "stats": {**{k: s.get(k) for k in ("state", "received", "sent", "dropped", "errors",
                                                             "busy_s", "depth", "restarts")},
                                    "streams_held": (s.get("metrics") or {}).get("streams_held")}}
        edges = [{"from": f"{e.src}.{e.src_port}", "to": f"{e.dst}.{e.dst_port}", "policy": e.policy}
                 for e in self.topology.edges if e.dst != TAP]
        return {"name": self.topology.name, "engines": nodes, "connections": edges}

    def healthy(self) -> bool:
        return self.thread.is_alive()

    def ready(self) -> bool:
        return self.launcher.started.is_set() and self.thread.is_alive()

    def events(self, stream: str | None, kind: str | None, since: float | None, limit: int) -> list[dict[str, Any]]:
        self.flush_events()
        return self.store.events(stream, kind, since, limit)

    def metrics(self) -> tuple[bytes, str]:
        from .metrics import render

        return render(self)

    # the tap -----------------------------------------------------------------------------------------------
    def observe(self, msg: Message) -> None:
        now = time.monotonic()
        capture = msg.times.get("capture")
        latency = time.time() - capture if capture else None
        events = msg.data.get("events") or []
        with self.lock:
            meter = self.meters.get(msg.stream)
            if meter is None:
                return  # a removed stream's last frames
            meter.add(now, latency)
            meter.events += len(events)
        if events:
            ts = capture or time.time()
            rows = [(ts, msg.stream, str(ev.get("event", ev.get("kind", "event"))), ev) for ev in events]
            with self.lock:
                self.pending.extend(rows)
                flush = len(self.pending) >= 100
            self.feed.publish([{"stream": s, "kind": k, "seq": msg.seq, "event": ev} for _, s, k, ev in rows])
            if flush:
                self.flush_events()

    def flush_events(self) -> None:
        with self.lock:
            rows, self.pending = self.pending, []
        self.store.add_events(rows)


# command line -----------------------------------------------------------------------------------------------------
def _prepare(graph_doc: dict[str, Any]) -> tuple[str, str | None, str]:
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
    engines[TAP] = {"type": "graphflow.service:Tap"}
    graph_doc.setdefault("connections", []).append([f"{listen}.out", f"{TAP}.in"])
    return src, (rules[0] if rules else None), listen


MALLOC_ARENAS = 2  # a long-lived service's malloc arenas (see graphflow.memory.limit_arenas), unless set already


def few_malloc_arenas() -> None:
    """Before any of the service's threads start: at most MALLOC_ARENAS malloc arenas in this process and in the
    engine processes it starts (through the environment), so memory freed as cameras come and go is reused
    instead of spread over an arena per thread. A MALLOC_ARENA_MAX the user set is kept."""
    from .memory import limit_arenas

    count = os.environ.setdefault("MALLOC_ARENA_MAX", str(MALLOC_ARENAS))
    if count.isdigit() and int(count) > 0:
        limit_arenas(int(count))


def serve(graph_path: str, host: str = "127.0.0.1", port: int = 8080, state: str = "graphflow.db",
          token: str | None = None, media: list[str] | None = None, overrides: dict | None = None,
          ray: str | None = None) -> int:
    """Run the service until SIGINT/SIGTERM; returns the exit code. With `ray` (`auto` or a cluster address) the
    graph runs as one replica per node of that Ray cluster (graphflow.cluster), behind the same API."""
    import json as json_mod

    try:
        import uvicorn
    except ImportError:
        raise GraphflowError("graphflow serve needs the service extra: pip install 'graphflow[serve]'") from None
    from . import graph as graph_mod
    from .api import create_app

    if not is_loopback(host) and not token:
        raise GraphflowError(f"serve: listening on {host} needs a token (--token or GRAPHFLOW_TOKEN)")
    path = Path(graph_path)
    try:
        doc = json_mod.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GraphflowError(f"{graph_path}: cannot read the graph ({exc})") from None
    if not isinstance(doc, dict):
        raise GraphflowError(f"{graph_path}: a graph file holds a JSON object")
    source, rule, _ = _prepare(doc)
    g = graph_mod.build(doc, str(path), overrides or {})
    roots = [Path(m) for m in (media or [str(path.resolve().parent)])]
    few_malloc_arenas()
    store = Store(state)
    if ray:
        from .cluster import ClusterController

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
    return service.summary.exit_code if service.summary is not None else 1


def add_subcommands(sub: Any) -> None:
    """Register `graphflow serve` and the `graphflow streams add|rm|ls` client on the CLI's subparsers."""
    import os

    p = sub.add_parser("serve", help="keep a graph running; cameras come and go through a REST API")
    p.add_argument("graph", help="graph JSON file (its decode engine takes the streams added through the API)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need --token)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--state", default="graphflow.db", help="SQLite file for streams, rules and events")
    p.add_argument("--token", default=os.environ.get("GRAPHFLOW_TOKEN"),
                   help="required on POST/PUT/DELETE (Authorization: Bearer TOKEN); default $GRAPHFLOW_TOKEN")
    p.add_argument("--media", action="append", default=[], metavar="DIR",
                   help="a folder stream files may come from (default: the graph file's folder)")
    p.add_argument("--set", action="append", default=[], metavar="ENGINE.PARAM=VALUE", help="override a param")
    p.add_argument("--ray", metavar="auto|ADDRESS", help="run one graph replica per node of this Ray cluster "
                   "(needs graphflow[cluster]); streams are placed on the nodes")
    p.set_defaults(fn=_cmd_serve)
    p = sub.add_parser("streams", help="add, remove or list the streams of a running `graphflow serve`")
    p.add_argument("action", choices=("add", "rm", "ls"))
    p.add_argument("id", nargs="?", help="stream id (add, rm)")
    p.add_argument("uri", nargs="?", help="file or rtsp:// address (add)")
    p.add_argument("--fps", type=float, help="frames per second to keep (add)")
    p.add_argument("--loop", action="store_true", help="play a file again at its end (add)")
    p.add_argument("--realtime", action="store_true", help="release a file's frames at their time (add)")
    p.add_argument("--server", default="http://127.0.0.1:8080", help="the service's URL")
    p.add_argument("--token", default=os.environ.get("GRAPHFLOW_TOKEN"), help="default $GRAPHFLOW_TOKEN")
    p.set_defaults(fn=_cmd_streams)


def _cmd_serve(args: Any) -> int:
    from . import graph as graph_mod

    return serve(args.graph, args.host, args.port, args.state, args.token, args.media or None,
                 graph_mod.parse_set(args.set), args.ray)


def _cmd_streams(args: Any) -> int:
    """A thin client of the REST API: one line per stream, or the server's one-line error (exit 1)."""
    import json as json_mod
    import urllib.error
    import urllib.request

    base = args.server.rstrip("/")
    if args.action in ("add", "rm") and not args.id:
        raise GraphflowError(f"streams {args.action}: give the stream id")
    if args.action == "add":
        if not args.uri:
            raise GraphflowError("streams add: give the stream's uri")
        spec: dict[str, Any] = {"id": args.id, "uri": args.uri}
        spec.update({k: v for k, v in (("fps", args.fps), ("loop", args.loop or None),
                                       ("realtime", args.realtime or None)) if v is not None})
        req = urllib.request.Request(f"{base}/streams", json_mod.dumps(spec).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    elif args.action == "rm":
        req = urllib.request.Request(f"{base}/streams/{args.id}", method="DELETE")
    else:
        req = urllib.request.Request(f"{base}/streams")
    if args.token:
        req.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json_mod.loads(detail)["error"]
        except (ValueError, KeyError, TypeError):
            pass
        print(f"error: {exc.code}: {detail}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        raise GraphflowError(f"streams: cannot reach {base} ({exc.reason})") from None
    if args.action == "ls":
        for s in json_mod.loads(body):
            lat = s.get("latency_ms") or {}
            print(f"{s['id']:<16} {s['state']:<12} frames={s['frames']:<7} fps={s['fps']:<6} "
                  f"p95={lat.get('p95')}ms  {s['uri']}")
    elif args.action == "add":
        s = json_mod.loads(body)
        print(f"added {s['id']} ({s['state']})")
    else:
        print(f"removed {args.id}")
    return 0
