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
    p.add_argument("graph", help="graph JSON file (its decode engine takes the streams added through the API)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need --token)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--state", default="graphflow.db", help="SQLite file for streams, rules and events")
    p.add_argument("--token", default=os.environ.get("GRAPHFLOW_TOKEN"),
                   help="required on POST/PUT/DELETE (Authorization: Bearer TOKEN); default $GRAPHFLOW_TOKEN")
    p.add_argument("--media", action="append", default=[], metavar="DIR",
                   help="a folder stream files may come from (default: the graph file's folder)")
    p.add_argument("--set", action="append", default=[], metavar="ENGINE.PARAM=VALUE", help="override a param")
    p.add_argument("--stats", metavar="FILE", help="at exit, write every counter and metric as JSON (as launch does)")
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
    from graphflow import graph as graph_mod

    return serve(args.graph, args.host, args.port, args.state, args.token, args.media or None,
                 graph_mod.parse_set(args.set), args.ray, args.stats)


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
