"""The REST API of `graphflow serve`: an ASGI app (Starlette) over a `Controller` that runs the graph.

Every error is one line of JSON (`{"error": "..."}`) with a 4xx code; request bodies are `application/json`,
size- and depth-limited, free of duplicate keys, and validated by the controller with the same checks as a graph
file. With a service token (always when the service listens beyond loopback) every request needs it but the
health checks, the page's own files and, with `metrics_open`, `/metrics`. Requests whose `Host` is not one of the
service's names or whose `Origin` is another site are refused (DNS rebinding, cross-site requests)."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from graphflow.errors import GraphflowError, Unavailable
from graphflow.graph.loader import loads
from graphflow.serve.store import StateError
from graphflow.serve.task import UnknownEvent, UnknownTask

if TYPE_CHECKING:
    from graphflow.serve.live import LiveFeed

MAX_BODY = 64 * 1024
MAX_DEPTH = 32  # nesting of lists and objects in a request body
MAX_LIVE = 256  # `/events/live` clients at once
MAX_VIEWERS = 32  # `preview.mjpg` clients at once, all streams
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/openapi.json"})  # answered without the token
log = logging.getLogger(__name__)


class Controller(Protocol):
    """What the API needs from the running service (graphflow.serve.controller.Service implements it)."""

    feed: LiveFeed  # the live events: each `/events/live` client subscribes to it

    def add_stream(self, spec: dict[str, Any]) -> dict[str, Any]: ...
    def remove_stream(self, stream: str) -> None: ...
    def streams(self) -> list[dict[str, Any]]: ...
    def stream(self, stream: str) -> dict[str, Any]: ...
    def rules(self, stream: str) -> list[dict[str, Any]]: ...
    def set_rules(self, stream: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]: ...
    def graph(self) -> dict[str, Any]: ...
    def healthy(self) -> bool: ...
    def ready(self) -> bool: ...
    def not_ready(self) -> str: ...  # why it is not ready (or not healthy), "" when it is
    def events(self, stream: str | None, kind: str | None, since: float | None, limit: int) -> list[dict[str, Any]]: ...
    def metrics(self) -> tuple[bytes, str]: ...


class TaskController(Controller, Protocol):
    """A controller that runs several tasks (graphflow.serve.controller.Service); the task routes need it."""

    def tasks_list(self) -> list[dict[str, Any]]: ...
    def task(self, tid: str) -> dict[str, Any]: ...
    def add_task(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def replace_task(self, tid: str, body: dict[str, Any]) -> dict[str, Any]: ...
    def remove_task(self, tid: str, stop_streams: bool = False) -> None: ...
    def update_stream(self, stream: str, changes: dict[str, Any]) -> dict[str, Any]: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "graphflow service", "version": "1", "description": (
        "With a service token every request needs it (Authorization: Bearer TOKEN, or ?token= on a GET) but "
        "/healthz, /readyz, /openapi.json and the dashboard's files. Bodies are application/json (else 415); "
        "a foreign Origin or Host is 403; a change the state file cannot save is 507, and nothing is applied.")},
    "security": [{"token": []}],
    "components": {
        "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
            "StreamSpec": {"type": "object", "required": ["id", "uri"], "properties": {
                "id": {"type": "string"}, "uri": {"type": "string"}, "fps": {"type": "number"},
                "loop": {"type": "boolean"}, "realtime": {"type": "boolean"}, "start": {"type": "number"},
                "max_frames": {"type": "integer"}, "transport": {"type": "string"}},
                "additionalProperties": True},
            "Stream": {"type": "object", "properties": {
                "id": {"type": "string"}, "uri": {"type": "string"}, "state": {"type": "string", "enum": [
                    "connecting", "running", "lagging", "reconnecting", "stalled", "failed", "ended", "stopped"]},
                "frames": {"type": "integer"}, "fps": {"type": "number"}, "drops": {"type": "integer"},
                "latency_ms": {"type": "object", "properties": {"p50": {"type": "number"}, "p95": {"type": "number"}}}}},
            "Rules": {"type": "array", "items": {"type": "object"}},
        }},
    "paths": {
        "/streams": {
            "get": {"summary": "list streams", "responses": {"200": {"description": "streams", "content": {
                "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Stream"}}}}}}},
            "post": {"summary": "add a stream", "security": [{"token": []}], "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/StreamSpec"}}}},
                "responses": {"201": {"description": "added"}, "400": {"description": "invalid"},
                              "401": {"description": "no or wrong token"}, "409": {"description": "id exists"},
                              "415": {"description": "not application/json"},
                              "503": {"description": "its task is not ready (see /readyz)"},
                              "507": {"description": "not saved, not added"}}}},
        "/streams/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"summary": "one stream", "responses": {"200": {"description": "the stream"},
                                                           "404": {"description": "unknown"}}},
            "delete": {"summary": "remove a stream", "security": [{"token": []}],
                       "responses": {"204": {"description": "removed"}, "404": {"description": "unknown"},
                                     "507": {"description": "not saved, still running"}}}},
        "/streams/{id}/rules": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"summary": "the stream's analytics rules", "responses": {"200": {"description": "rules"}}},
            "put": {"summary": "replace the stream's rules (applied live)", "security": [{"token": []}],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Rules"}}}},
                    "responses": {"200": {"description": "applied"}, "400": {"description": "invalid"},
                                  "507": {"description": "not saved, not applied"}}}},
        "/tasks": {
            "get": {"summary": "list tasks", "responses": {"200": {"description": "tasks"}}},
            "post": {"summary": "add a task: {id, graph, labels?} (checked as an untrusted graph)",
                     "security": [{"token": []}], "responses": {"201": {"description": "started"},
                                                               "400": {"description": "invalid"},
                                                               "409": {"description": "id exists"}}}},
        "/tasks/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"summary": "a task: its graph, engines with stats, streams", "responses": {
                "200": {"description": "the task"}, "404": {"description": "unknown"}}},
            "put": {"summary": "replace a task's graph: {graph, labels?}; its streams move over live",
                    "security": [{"token": []}], "responses": {"200": {"description": "replaced"}}},
            "delete": {"summary": "remove a task (409 while streams use it, unless ?stop_streams=true)",
                       "security": [{"token": []}], "responses": {"204": {"description": "removed"},
                                                                 "409": {"description": "streams use it"}}}},
        "/events": {"get": {"summary": "recent events, newest first", "parameters": [
            {"name": n, "in": "query", "schema": {"type": t}} for n, t in
            (("stream", "string"), ("kind", "string"), ("since", "number"), ("limit", "integer"), ("task", "string"))],
            "responses": {"200": {"description": "events"}}}},
        "/events/live": {"get": {"summary": "live events (Server-Sent Events)",
                                 "responses": {"200": {"description": "text/event-stream"}}}},
        "/graph": {"get": {"summary": "engines, placement and per-engine stats", "responses": {"200": {"description": "graph"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format"}}}},
        "/healthz": {"get": {"summary": "every task's graph runs and no engine is gone for good", "security": [],
                             "responses": {"200": {"description": "ok"},
                                           "503": {"description": "broken for good: {ok: false, reason}"}}}},
        "/readyz": {"get": {"summary": "every engine of every task is set up and running: streams are accepted", "security": [],
                            "responses": {"200": {"description": "ready"},
                                          "503": {"description": "not now: {ready: false, reason}"}}}},
    },
}


def create_app(controller: Controller, token: str | None = None, hosts: Collection[str] | None = LOOPBACK_NAMES,
               metrics_open: bool = False, max_viewers: int = MAX_VIEWERS) -> Any:
    """The ASGI app serving `controller`: `token`, when set, is required on every request but OPEN_PATHS, `/web/*`
    and, with `metrics_open`, `/metrics`; `hosts` are the names the service answers to (None: any, for a service
    listening on every address, which needs a token); `max_viewers` caps open MJPEG streams."""
    from starlette.applications import Starlette

    routes = [*_stream_routes(controller, _guarded), *_task_routes(controller, _guarded),
              *_service_routes(controller, _guarded),
              *dashboard_routes(controller, _guarded, _call, max_viewers)]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found})
    return Guard(app, token, None if hosts is None else frozenset(h.lower() for h in hosts),
                 OPEN_PATHS | ({"/metrics"} if metrics_open else set()))


class Guard:
    """ASGI middleware in front of every route: the request's Host and Origin, then the token, checked before any
    handler runs; a refusal is the API's one-line JSON error."""

    def __init__(self, app: Any, token: str | None, hosts: frozenset[str] | None, open_paths: Collection[str]) -> None:
        self.app, self.token, self.hosts, self.open_paths = app, token, hosts, open_paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            from starlette.requests import Request

            refused = self.refusal(Request(scope))
            if refused is not None:
                await _error(*refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, request: Any) -> tuple[int, str] | None:
        """(status, reason) for a request to refuse, or None."""
        host = request.headers.get("host", "")
        if self.hosts is not None and _hostname(host) not in self.hosts:
            return 403, f"{request.method} {request.url.path}: Host {host[:80]!r} is not this service's address"
        origin = request.headers.get("origin")
        if origin is not None and (urlsplit(origin).netloc.lower() != host.lower() or not host):
            return 403, f"{request.method} {request.url.path}: requests from {origin[:80]!r} are not allowed"
        path = request.url.path
        if self.token is None or path in self.open_paths or path.startswith("/web/"):
            return None
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given and request.method == "GET":  # pictures and event streams cannot send headers
            given = request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return 401, f"{request.method} {path}: missing or wrong token (Authorization: Bearer TOKEN)"
        return None


def _hostname(host: str) -> str:
    """The name or address of a Host header, its port left out (`[::1]:80` → `::1`)."""
    try:
        return (urlsplit(f"//{host}").hostname or "").lower()
    except ValueError:
        return ""


def _error(status: int, message: str) -> Any:
    """The API's error answer: one line of JSON."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": _one_line(message)}, status_code=status)


async def _body(request: Any) -> Any:
    """The request's JSON body: refused unless declared `application/json` (so no other site's form can send one),
    over MAX_BODY bytes (declared or streamed), or when it does not parse, repeats a key or nests over MAX_DEPTH."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"{request.method} {request.url.path}: the body must be sent as application/json "
                            f"(got {kind[:60] or 'no Content-Type'})")
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise ApiError(400, "Content-Length is not a number") from None
    if declared > MAX_BODY:
        raise ApiError(413, f"request body over {MAX_BODY} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
    try:
        body = loads(raw.decode("utf-8") if raw else "null")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"body is not JSON: {exc}") from None
    if _depth(body) > MAX_DEPTH:
        raise ApiError(400, f"body: lists and objects nest deeper than {MAX_DEPTH} levels")
    return body


def _depth(value: Any) -> int:
    """How deep lists and objects nest in `value` (a scalar: 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            todo.extend((child, level + 1) for child in children)
    return deepest


async def _call(fn: Any, *args: Any) -> Any:
    """Controller calls may wait on engines: run them off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _failure(request: Any, exc: Exception) -> Any:
    """The answer to what a handler raised: a status per kind of error, or 500 for a bug of ours (one line for the
    client, the traceback in the server's log). Call it from the `except` block."""
    if isinstance(exc, ApiError):
        return _error(exc.status, str(exc))
    if isinstance(exc, StateError):
        return _error(507, str(exc))
    if isinstance(exc, UnknownTask):
        return _error(404, f"no task {exc.args[0]!r}")
    if isinstance(exc, UnknownEvent):
        return _error(404, f"no event or evidence {exc.args[0]!r} (evidence is written a few seconds after its event, "
                           "and pruned by age and size)")
    if isinstance(exc, KeyError):
        return _error(404, f"no stream {exc.args[0]!r}")
    if isinstance(exc, FileExistsError):
        return _error(409, str(exc))
    if isinstance(exc, Unavailable):
        return _error(503, str(exc))
    if isinstance(exc, (GraphflowError, ValueError)):
        return _error(400, str(exc))
    if isinstance(exc, TimeoutError):
        return _error(503, str(exc))
    log.exception("%s %s failed", request.method, request.url.path)
    return _error(500, f"internal error: {type(exc).__name__}: {exc}")


def _guarded(handler: Any) -> Any:
    """`handler` with every error it raises answered as one line of JSON."""
    async def endpoint(request: Any) -> Any:
        try:
            return await handler(request)
        except Exception as exc:
            return _failure(request, exc)
    return endpoint


async def _not_found(request: Any, exc: Exception) -> Any:
    return _error(getattr(exc, "status_code", 404), f"{request.method} {request.url.path}: "
                  f"{getattr(exc, 'detail', 'not found')}")


def _stream_routes(controller: Controller, wrap: Any) -> list[Any]:
    """Streams (list, add, get, remove), a stream's rules, and the events (recent, and live)."""
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def list_streams(request: Any) -> Response:
        if request.method == "POST":
            spec = await _body(request)
            if not isinstance(spec, dict):
                raise ApiError(400, "body must be a JSON object with at least 'id' and 'uri'")
            return JSONResponse(await _call(controller.add_stream, spec), status_code=201)
        return JSONResponse(await _call(controller.streams))

    async def one_stream(request: Any) -> Response:
        stream = request.path_params["id"]
        if request.method == "DELETE":
            await _call(controller.remove_stream, stream)
            return Response(status_code=204)
        if request.method == "PUT":
            changes = await _body(request)
            if not isinstance(changes, dict):
                raise ApiError(400, 'body must be a JSON object such as {"task": "ID"}')
            if not hasattr(controller, "update_stream"):
                raise ApiError(400, "this service runs one graph: a stream's task cannot change")
            return JSONResponse(await _call(controller.update_stream, stream, changes))
        return JSONResponse(await _call(controller.stream, stream))

    async def rules(request: Any) -> Response:
        stream = request.path_params["id"]
        if request.method == "PUT":
            new = await _body(request)
            if not isinstance(new, list):
                raise ApiError(400, "body must be a JSON list of rules")
            return JSONResponse(await _call(controller.set_rules, stream, new))
        return JSONResponse(await _call(controller.rules, stream))

    async def events(request: Any) -> Response:
        q = request.query_params
        try:
            since = float(q["since"]) if "since" in q else None
            limit = min(max(int(q.get("limit", 100)), 1), 10_000)
        except ValueError:
            raise ApiError(400, "since must be a number (epoch seconds) and limit an integer") from None
        task = {"task": q["task"]} if "task" in q else {}  # only a service of tasks knows them
        return JSONResponse(await _call(lambda: controller.events(q.get("stream"), q.get("kind"), since, limit, **task)))

    return [Route("/streams", wrap(list_streams), methods=["GET", "POST"]),
            Route("/streams/{id}", wrap(one_stream), methods=["GET", "PUT", "DELETE"]),
            Route("/streams/{id}/rules", wrap(rules), methods=["GET", "PUT"]),
            Route("/events", wrap(events)), Route("/events/live", wrap(_live_events(controller))),
            *_evidence_routes(controller, wrap)]


EVIDENCE_TYPES = {"snapshot.jpg": ("snapshot", "image/jpeg"), "crop.jpg": ("crop", "image/jpeg"),
                  "clip.mp4": ("clip", "video/mp4")}


def _evidence_routes(controller: Any, wrap: Any) -> list[Any]:
    """`/events/{id}` (one event, its evidence linked) and its files (HTTP range requests, so a browser seeks)."""
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    if not hasattr(controller, "evidence_file"):
        return []

    async def one_event(request: Any) -> Response:
        return JSONResponse(await _call(controller.event, request.path_params["id"]))

    async def evidence(request: Any) -> Response:
        name = request.path_params["file"]
        if name not in EVIDENCE_TYPES:
            raise ApiError(404, f"no evidence {name!r} (one of {', '.join(EVIDENCE_TYPES)})")
        kind, media = EVIDENCE_TYPES[name]
        path = await _call(controller.evidence_file, request.path_params["id"], kind)
        return FileResponse(path, media_type=media, headers={"Cache-Control": "max-age=3600"})

    return [Route("/events/{id}", wrap(one_event)), Route("/events/{id}/{file}", wrap(evidence))]


def _live_events(controller: Controller) -> Any:
    """The endpoint of `/events/live[?stream=ID]`: events as Server-Sent Events while the client stays, with a
    keep-alive comment every second without one; waits on the event loop (no thread per client), MAX_LIVE at most."""
    from starlette.responses import Response, StreamingResponse

    async def live(request: Any) -> Response:
        if controller.feed.subscribers() >= MAX_LIVE:
            raise ApiError(503, f"{MAX_LIVE} live event clients already; try again later")
        queue = controller.feed.subscribe()
        stream_filter = request.query_params.get("stream")

        async def feed() -> Any:
            try:
                yield b": graphflow events\n\n"
                while True:
                    items = await queue.take(1.0)
                    if items is None:
                        yield b": keep-alive\n\n"
                        continue
                    for item in items:
                        if stream_filter is None or item.get("stream") == stream_filter:
                            yield f"data: {json.dumps(item, default=str)}\n\n".encode()
            finally:
                controller.feed.unsubscribe(queue)
        return StreamingResponse(feed(), media_type="text/event-stream")
    return live


def _task_routes(controller: Any, wrap: Any) -> list[Any]:
    """Tasks (list, add, get, replace, remove) and a task's graph picture; a controller of one graph (the cluster
    front) lists none and refuses the rest."""
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    if not hasattr(controller, "tasks_list"):
        async def no_tasks(request: Any) -> Response:
            if request.method == "GET" and request.url.path == "/tasks":
                return JSONResponse([])
            raise ApiError(400, "this service runs one graph: tasks need `graphflow serve` without --ray")
        return [Route("/tasks", wrap(no_tasks), methods=["GET", "POST"]),
                Route("/tasks/{id}", wrap(no_tasks), methods=["GET", "PUT", "DELETE"])]
    tasks: TaskController = controller

    async def task_body(request: Any) -> dict[str, Any]:
        body = await _body(request)
        if not isinstance(body, dict) or not isinstance(body.get("graph"), dict):
            raise ApiError(400, "body must be a JSON object with 'graph' (a graph document), and 'id' to add one")
        return body

    async def list_tasks(request: Any) -> Response:
        if request.method == "POST":
            return JSONResponse(await _call(tasks.add_task, await task_body(request)), status_code=201)
        return JSONResponse(await _call(tasks.tasks_list))

    async def one_task(request: Any) -> Response:
        tid = request.path_params["id"]
        if request.method == "DELETE":
            stop = request.query_params.get("stop_streams", "false").lower() in ("1", "true", "yes")
            await _call(tasks.remove_task, tid, stop)
            return Response(status_code=204)
        if request.method == "PUT":
            body = await task_body(request)
            if body.get("id", tid) != tid:
                raise ApiError(400, f"id: the body names task {body['id']!r}, the URL {tid!r}")
            return JSONResponse(await _call(tasks.replace_task, tid, body))
        return JSONResponse(await _call(tasks.task, tid))

    async def task_picture(request: Any) -> Response:
        return Response(await _call(tasks.graph_png, request.path_params["id"]), media_type="image/png")

    return [Route("/tasks", wrap(list_tasks), methods=["GET", "POST"]),
            Route("/tasks/{id}", wrap(one_task), methods=["GET", "PUT", "DELETE"]),
            Route("/tasks/{id}/graph.png", wrap(task_picture))]


def _service_routes(controller: Controller, wrap: Any) -> list[Any]:
    """The service as a whole: its graph, metrics, health, readiness and this API's OpenAPI description."""
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def graph(request: Any) -> Response:
        return JSONResponse(await _call(controller.graph))

    async def metrics(request: Any) -> Response:
        data, content_type = await _call(controller.metrics)
        return Response(data, media_type=content_type)

    async def healthz(request: Any) -> Response:
        ok = controller.healthy()
        return JSONResponse({"ok": ok} | ({} if ok else {"reason": controller.not_ready()}),
                            status_code=200 if ok else 503)

    async def readyz(request: Any) -> Response:
        reason = controller.not_ready()
        return JSONResponse({"ready": not reason} | ({"reason": reason} if reason else {}),
                            status_code=503 if reason else 200)

    async def openapi(request: Any) -> Response:
        return JSONResponse(OPENAPI)

    return [Route("/graph", wrap(graph)), Route("/metrics", wrap(metrics)), Route("/healthz", healthz),
            Route("/readyz", readyz), Route("/openapi.json", openapi)]


# dashboard: the web page, live previews and the graph picture ------------------------------------------------------
WEB = Path(__file__).with_name("web")
MJPEG_BOUNDARY = "graphflow-preview"
SNAPSHOT_WAIT_S = 3.0  # a snapshot waits this long for a first picture
SNAPSHOT_HOLD_S = 1.5  # a snapshot keeps its stream's previews coming this long, for the page's next poll
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
OPENAPI["paths"].update({
    "/": {"get": {"summary": "the dashboard (HTML)", "responses": {"200": {"description": "text/html"}}}},
    "/docs": {"get": {"summary": "this API's reference, drawn from /openapi.json (HTML)",
                      "responses": {"200": {"description": "text/html"}}}},
    "/streams/{id}/preview.mjpg": {"parameters": _ID, "get": {
        "summary": "live annotated video, MJPEG (multipart/x-mixed-replace); encoded only while watched",
        "responses": {"200": {"description": "multipart JPEG stream"}, "404": {"description": "unknown"}}}},
    "/streams/{id}/preview.jpg": {"parameters": _ID + [{"name": "after", "in": "query", "schema": {"type": "integer"}}],
                                  "get": {"summary": "one annotated JPEG: the newest, or the first numbered above "
                                                     "`after` (its number in X-Preview)", "responses": {
                                      "200": {"description": "image/jpeg"}, "204": {"description": "no picture yet"},
                                      "404": {"description": "unknown"}}}},
    "/streams/{id}/preview.json": {"parameters": _ID, "get": {
        "summary": "live rule figures (geometry in pixels, line counts, zone occupancy), frame size, viewers",
        "responses": {"200": {"description": "figures"}}}},
    "/streams/{id}/events/{frame}.jpg": {"parameters": _ID + [{"name": "frame", "in": "path", "required": True,
                                                                "schema": {"type": "integer"}}], "get": {
        "summary": "the picture of an event's frame, when it was watched", "responses": {
            "200": {"description": "image/jpeg"}, "404": {"description": "not kept"}}}},
    "/graph.png": {"get": {"summary": "the graph's engines and connections, drawn",
                           "responses": {"200": {"description": "image/png"}}}},
})


def dashboard_routes(controller: Controller, wrap: Any, call: Any, max_viewers: int = MAX_VIEWERS) -> list[Any]:
    """Routes of the dashboard: `/`, `/docs` (the API reference) and `/web/*` (static files shipped in the package), a stream's live preview as
    MJPEG (`preview.mjpg`, a viewer while connected), as one JPEG (`preview.jpg[?after=N]`: the newest, or the
    first numbered above N, its number in X-Preview; 204 while there is none), its rule figures
    (`preview.json`), the picture of an event's frame (`events/{frame}.jpg`) and the graph picture (`/graph.png`).
    Previews come from `controller.previews` (graphflow.serve.previews.Previews); without it they answer 404."""
    from starlette.responses import FileResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def index(request: Any) -> Response:
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    async def docs(request: Any) -> Response:
        return FileResponse(WEB / "docs.html", headers={"Cache-Control": "no-cache"})

    return [Route("/", index), Route("/docs", docs), Mount("/web", StaticFiles(directory=WEB), name="web"),
            Route("/streams/{id}/preview.mjpg", wrap(_mjpeg(controller, call, max_viewers))),
            Route("/streams/{id}/preview.jpg", wrap(_snapshot(controller, call))),
            Route("/streams/{id}/preview.json", wrap(_figures(controller, call))),
            Route("/streams/{id}/events/{frame:int}.jpg", wrap(_event_picture(controller))),
            Route("/graph.png", wrap(_graph_picture(controller, call)))]


def _previews(controller: Controller) -> Any:
    """The controller's live previews; ApiError 404 when the service keeps none."""
    previews = getattr(controller, "previews", None)
    if previews is None:
        raise ApiError(404, "live previews are off in this service")
    return previews


def _mjpeg(controller: Controller, call: Any, max_viewers: int) -> Any:
    """The endpoint of `preview.mjpg`: a multipart JPEG stream, the stream watched while the client stays; it ends
    when the stream is removed. At most `max_viewers` are open at once (all streams); past that, 503."""
    from starlette.responses import Response, StreamingResponse

    open_now = [0]

    async def mjpeg(request: Any) -> Response:
        stream = request.path_params["id"]
        previews = _previews(controller)
        await call(controller.stream, stream)
        if open_now[0] >= max_viewers:
            raise ApiError(503, f"{max_viewers} live previews open already; close one, or poll preview.jpg")

        async def feed() -> Any:
            with previews.watch(stream):
                seen = 0
                while True:
                    preview = await previews.next(stream, seen, 1.0)
                    if preview is None:
                        try:
                            await call(controller.stream, stream)
                        except KeyError:
                            return  # removed: the viewer's image ends
                        continue
                    seen = preview.n
                    yield (f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(preview.jpeg)}"
                           f"\r\nX-Frame: {preview.frame}\r\n\r\n").encode() + preview.jpeg + b"\r\n"
        return Counted(feed(), media_type=f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}",
                       headers={"Cache-Control": "no-cache, no-store"})

    class Counted(StreamingResponse):
        """Counted in `open_now` from its creation until it was sent (or its client went)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            open_now[0] += 1

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                open_now[0] -= 1
    return mjpeg


def _snapshot(controller: Controller, call: Any) -> Any:
    """The endpoint of `preview.jpg[?after=N]`: one JPEG, fresh or the first numbered above N, waiting for it up to
    SNAPSHOT_WAIT_S; the stream's previews then keep coming SNAPSHOT_HOLD_S for the page's next poll."""
    from starlette.responses import Response

    async def snapshot(request: Any) -> Response:
        stream = request.path_params["id"]
        previews = _previews(controller)
        await call(controller.stream, stream)
        try:
            after = int(request.query_params.get("after", -1))
        except ValueError:
            raise ApiError(400, "after must be an integer (the X-Preview number of the last picture)") from None
        with previews.watch(stream):
            preview = previews.latest(stream)
            if after >= 0 or preview is None or time.time() - preview.time > 2.0 / previews.max_fps:
                floor = after if after >= 0 else (preview.n if preview is not None else 0)
                preview = await previews.next(stream, floor, SNAPSHOT_WAIT_S)
        previews.hold(stream, SNAPSHOT_HOLD_S)
        if preview is None:  # no picture yet (connecting, or no frame came within SNAPSHOT_WAIT_S): not an error
            return Response(status_code=204, headers={"Cache-Control": "no-store"})
        return Response(preview.jpeg, media_type="image/jpeg", headers={
            "Cache-Control": "no-store", "X-Preview": str(preview.n), "X-Frame": str(preview.frame)})
    return snapshot


def _figures(controller: Controller, call: Any) -> Any:
    """The endpoint of `preview.json`: the stream's rule figures and frame size, and how many watch it."""
    from starlette.responses import JSONResponse, Response

    async def figures(request: Any) -> Response:
        stream = request.path_params["id"]
        previews = _previews(controller)
        await call(controller.stream, stream)
        return JSONResponse({"viewers": previews.viewers(stream), **previews.info(stream)})
    return figures


def _event_picture(controller: Controller) -> Any:
    """The endpoint of `events/{frame}.jpg`: the kept picture of an event's frame, 404 when it was not kept."""
    from starlette.responses import Response

    async def event_picture(request: Any) -> Response:
        stream, frame = request.path_params["id"], request.path_params["frame"]
        preview = _previews(controller).picture(stream, frame)
        if preview is None:
            raise ApiError(404, f"no picture of frame {frame} of stream {stream!r} "
                                "(only the last ones watched are kept)")
        return Response(preview.jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
    return event_picture


def _graph_picture(controller: Controller, call: Any) -> Any:
    """The endpoint of `/graph.png`: the controller's drawing of the graph, 404 when it draws none."""
    from starlette.responses import Response

    async def graph_picture(request: Any) -> Response:
        draw = getattr(controller, "graph_png", None)
        if draw is None:
            raise ApiError(404, "this service draws no graph picture")
        return Response(await call(draw), media_type="image/png")
    return graph_picture
