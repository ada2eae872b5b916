"""The `serve` and `streams` commands: run the service, and talk to a running one over HTTP."""
from __future__ import annotations

import os
import sys
from typing import Any

from graphflow.errors import GraphflowError
from graphflow.serve.main import serve


def add_subcommands(sub: Any) -> None:
    """Register `graphflow serve` and the `graphflow streams add|rm|ls` client on the CLI's subparsers."""

    p = sub.add_parser("serve", help="keep a graph running; cameras come and go through a REST API")
    p.add_argument("graph", nargs="*", help="graph JSON files, one task each, named after the file (the first is the "
                   "default task; each decode engine takes the streams added through the API)")
    p.add_argument("--tasks", metavar="DIR", help="a folder of graph files: each *.json is a task too")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need --token)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--state", default="graphflow.db", help="SQLite file for streams, rules and events")
    p.add_argument("--token", default=os.environ.get("GRAPHFLOW_TOKEN"),
                   help="required on every request but /healthz and /readyz (Authorization: Bearer TOKEN, or "
                        "?token= on GET); default $GRAPHFLOW_TOKEN")
    p.add_argument("--metrics-open", action="store_true", help="leave /metrics readable without the token")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a name the service answers to besides 127.0.0.1, localhost and ::1 (a reverse proxy's); "
                        "other Host headers get 403")
    p.add_argument("--allow-broker", action="append", default=[], metavar="HOST:PORT",
                   help="a server beyond loopback that tasks added through the API may send events to")
    p.add_argument("--media", action="append", default=[], metavar="DIR",
                   help="a folder stream files may come from (default: the graph file's folder)")
    p.add_argument("--set", action="append", default=[], metavar="ENGINE.PARAM=VALUE",
                   help="override a param of the first graph")
    p.add_argument("--stats", metavar="FILE", help="at exit, write every counter and metric as JSON (as launch does)")
    p.add_argument("--evidence", metavar="DIR", help="where each event's snapshot, crop and clip go (default: "
                   "evidence/ beside --state)")
    p.add_argument("--no-evidence", action="store_true", help="keep no evidence of events")
    p.add_argument("--evidence-pre", type=float, default=5.0, metavar="S", help="clip seconds before the event")
    p.add_argument("--evidence-post", type=float, default=5.0, metavar="S", help="clip seconds after the event")
    p.add_argument("--evidence-keep-mb", type=float, default=2000.0, metavar="MB", help="evidence kept at most, "
                   "oldest deleted first")
    p.add_argument("--evidence-keep-days", type=float, default=7.0, metavar="DAYS", help="evidence kept at most")
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
    p.add_argument("--task", help="the task that runs the stream (add; default: the service's default task)")
    client_options(p)
    p.set_defaults(fn=_cmd_streams)
    p = sub.add_parser("tasks", help="add, replace, remove, list or show the tasks of a running `graphflow serve`")
    p.add_argument("action", choices=("add", "rm", "ls", "show"), help="add ID GRAPH (replaces the task if it "
                   "exists), rm ID [--stop-streams], ls, show ID")
    p.add_argument("id", nargs="?", help="task id (add, rm, show)")
    p.add_argument("file", nargs="?", help="graph JSON file (add)")
    p.add_argument("--stop-streams", action="store_true", help="rm: remove the task's streams too")
    client_options(p)
    p.set_defaults(fn=_cmd_tasks)


def client_options(p: Any) -> None:
    p.add_argument("--server", default="http://127.0.0.1:8080", help="the service's URL")
    p.add_argument("--token", default=os.environ.get("GRAPHFLOW_TOKEN"), help="default $GRAPHFLOW_TOKEN")


def _cmd_serve(args: Any) -> int:
    from graphflow import graph as graph_mod
    from graphflow.serve.evidence import EvidencePolicy

    for name in ("evidence_pre", "evidence_post", "evidence_keep_mb", "evidence_keep_days"):
        if not 0 <= getattr(args, name) <= 10**6:
            raise GraphflowError(f"serve: --{name.replace('_', '-')} must be a number from 0 to 1000000 "
                                 f"(got {getattr(args, name)})")
    evidence = None if args.no_evidence else EvidencePolicy(args.evidence_pre, args.evidence_post,
                                                            args.evidence_keep_mb, args.evidence_keep_days)
    return serve(args.graph, args.host, args.port, args.state, args.token, args.media or None,
                 graph_mod.parse_set(args.set), args.ray, args.tasks, evidence, args.evidence, args.metrics_open,
                 args.allow_host, args.allow_broker, args.stats)


def _request(args: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One call of the service's API: (status, parsed JSON or None); an HTTP error is (code, its one-line error)."""
    import json as json_mod
    import urllib.error
    import urllib.request

    base = args.server.rstrip("/")
    data = None if body is None else json_mod.dumps(body).encode()
    req = urllib.request.Request(f"{base}{path}", data, method=method, headers={"Content-Type": "application/json"})
    if args.token:
        req.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(req, timeout=180) as resp:
            raw = resp.read()
            return resp.status, json_mod.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json_mod.loads(detail)["error"]
        except (ValueError, KeyError, TypeError):
            pass
        return exc.code, detail
    except urllib.error.URLError as exc:
        raise GraphflowError(f"cannot reach {base} ({exc.reason})") from None


def _cmd_tasks(args: Any) -> int:
    """`graphflow tasks add|rm|ls|show`: one line per task, or the server's one-line error (exit 1)."""
    import json as json_mod
    from pathlib import Path

    if args.action != "ls" and not args.id:
        raise GraphflowError(f"tasks {args.action}: give the task id")
    if args.action == "add":
        if not args.file:
            raise GraphflowError("tasks add: give the task's graph file")
        try:
            doc = json_mod.loads(Path(args.file).read_text())
        except (OSError, ValueError) as exc:
            raise GraphflowError(f"{args.file}: cannot read the graph ({exc})") from None
        status, body = _request(args, "GET", f"/tasks/{args.id}")
        exists = status == 200
        status, body = _request(args, "PUT" if exists else "POST", f"/tasks/{args.id}" if exists else "/tasks",
                                {"id": args.id, "graph": doc})
    elif args.action == "rm":
        status, body = _request(args, "DELETE", f"/tasks/{args.id}" + ("?stop_streams=true" if args.stop_streams else ""))
    else:
        status, body = _request(args, "GET", "/tasks" if args.action == "ls" else f"/tasks/{args.id}")
    if status >= 400:
        print(f"error: {status}: {body}", file=sys.stderr)
        return 1
    if args.action == "ls":
        for t in body:
            print(f"{t['id']:<16} {'ready' if t['ready'] else 'starting':<9} engines={t['engines']:<3} "
                  f"streams={len(t['streams']):<4} {t['name']}{'  (default)' if t['default'] else ''}")
        if not body:
            print("no tasks")
    elif args.action == "show":
        print(json_mod.dumps(body, indent=2))
    else:
        print(f"{'removed' if args.action == 'rm' else 'replaced' if exists else 'added'} task {args.id}")
    return 0


def _cmd_streams(args: Any) -> int:
    """A thin client of the REST API: one line per stream, or the server's one-line error (exit 1)."""
    if args.action in ("add", "rm") and not args.id:
        raise GraphflowError(f"streams {args.action}: give the stream id")
    if args.action == "add":
        if not args.uri:
            raise GraphflowError("streams add: give the stream's uri")
        spec: dict[str, Any] = {"id": args.id, "uri": args.uri}
        spec.update({k: v for k, v in (("fps", args.fps), ("loop", args.loop or None),
                                       ("realtime", args.realtime or None), ("task", args.task)) if v is not None})
        status, body = _request(args, "POST", "/streams", spec)
    elif args.action == "rm":
        status, body = _request(args, "DELETE", f"/streams/{args.id}")
    else:
        status, body = _request(args, "GET", "/streams")
    if status >= 400:
        print(f"error: {status}: {body}", file=sys.stderr)
        return 1
    if args.action == "ls":
        for s in body:
            lat = s.get("latency_ms") or {}
            print(f"{s['id']:<16} {s['state']:<12} frames={s['frames']:<7} fps={s['fps']:<6} "
                  f"p95={lat.get('p95')}ms  {s.get('task', '')}  {s['uri']}")
        if not body:
            print("no streams")
    elif args.action == "add":
        print(f"added {body['id']} ({body['state']})")
    else:
        print(f"removed {args.id}")
    return 0
