"""The service's controller: tasks (graphs, each on its own launcher) and the streams bound to them, changed live
through the API while everything else keeps running."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from graphflow.errors import GraphflowError, Unavailable
from graphflow.message import Message
from graphflow.runtime.sharing import STAGES, SharedStages
from graphflow.serve.evidence import KINDS, Evidence, EvidencePolicy
from graphflow.serve.live import LiveFeed
from graphflow.serve.previews import Previews, graph_png
from graphflow.serve.store import StateError, Store
from graphflow.serve.streams import StreamMeter, check_stream_uri, clashing, each_stream, redact, stream_id
from graphflow.serve.tap import TAP
from graphflow.serve.task import Task, UnknownEvent, UnknownTask, build_task, task_id

log = logging.getLogger(__name__)


class TaskTap:
    """What one task's tap engine reaches (EngineContext.service): the service, with every frame labelled by the
    task that produced it, so events and metrics carry their own task even while a stream moves."""

    def __init__(self, service: Service, task: str) -> None:
        self.service, self.task = service, task

    def observe(self, msg: Message) -> None:
        self.service.previews.offer(msg)
        self.service.observe(msg, self.task)

    def stream_ended(self, stream: str) -> None:
        self.service.stream_ended(stream)


class Service:
    """Implements graphflow.serve.api.Controller over tasks. A stream spec names its task (`"task"`, default: the
    service's default task); the task's source engine decodes it, its rule engine takes the stream's rules."""

    def __init__(self, store: Store, media_roots: list[Path] | None = None, preview_fps: float = 5.0,
                 preview_width: int = 640, restrictions: Any = None, evidence: tuple[Path, EvidencePolicy] | None = None
                 ) -> None:
        self.store = store
        self.media_roots = [r.resolve() for r in (media_roots or [])]
        self.restrictions = restrictions  # how a task from the network is checked (None: as trusted as a file)
        self.tasks: dict[str, Task] = {}
        self.default: str | None = None  # the task of a stream that names none
        self.meters: dict[str, StreamMeter] = {}
        self.meter_task: dict[str, str] = {}  # stream → the task its meter's latest frames came from
        self.specs: dict[str, dict[str, Any]] = {}
        self.rules_of: dict[str, list[dict[str, Any]]] = {}
        self.feed = LiveFeed()
        self.lock = threading.Lock()  # the maps above
        self.changes = threading.Lock()  # one task or stream change at a time (a task's start happens outside it)
        self.pending: list[tuple[float, str, str, dict[str, Any], str]] = []
        self.unsaved_events = 0  # events the state file refused (full disk): delivered live, not kept
        self.previews = Previews(max_fps=preview_fps, max_width=preview_width)
        self.started = time.monotonic()
        self.summaries: dict[str, Any] = {}  # task → the summary of its last stopped graph
        self.stages = SharedStages()  # e.g. one detector for every task whose infer engine is defined alike
        self.evidence = Evidence(evidence[0], evidence[1], self._request_clip) if evidence else None

    # lifecycle ---------------------------------------------------------------------------------------------
    def start(self, file_tasks: list[Task] = ()) -> None:
        """Start the tasks given on the command line (the first one is the default task), then those of the state
        file, then the streams of the state file with their rules."""
        for task in file_tasks:
            self._start(task)
            with self.lock:
                self.tasks[task.id] = task
                self.default = self.default or task.id
        for row in self.store.tasks():
            if row["id"] in self.tasks:
                continue  # the command line's graph for this id wins
            try:
                self._start_new(row["id"], row["graph"], row["labels"])
            except (GraphflowError, ValueError, TimeoutError) as exc:
                log.error("task %r from the state file not restored: %s", row["id"], exc)
        for row in self.store.streams():
            try:
                self._admit(row["spec"])
                self._open(row["spec"], row["rules"])
            except (GraphflowError, ValueError, KeyError, FileExistsError) as exc:
                log.error("stream %r from the state file not restored: %s", redact(str(row["spec"].get("id"))[:80]),
                          redact(str(exc)))

    def _start(self, task: Task) -> None:
        task.start({TAP: TaskTap(self, task.id), STAGES: self.stages}, lambda stats: self._watch_lag(task.id, stats))

    def _start_new(self, tid: str, doc: Any, labels: Any) -> Task:
        task = build_task(tid, doc, "<task>", restrictions=self.restrictions, labels=labels)
        self._start(task)
        with self.lock:
            self.tasks[task.id] = task
        return task

    def stop(self) -> None:
        with self.lock:
            tasks = list(self.tasks.values())
        for task in tasks:
            task.stop()
            self.summaries[task.id] = task.summary
        self.flush_events()
        self.previews.close()
        if self.evidence is not None:
            self.evidence.close()

    def stats_document(self) -> dict[str, Any]:
        """After `stop`: the worst task's `--stats` document (as launch writes it), with every task's under
        `tasks`."""
        with self.lock:
            tasks = {t.id: t for t in self.tasks.values() if t.summary is not None}
        docs = {tid: t.summary.document(t.topology) for tid, t in tasks.items()}
        worst = max(docs.values(), key=lambda d: (d["exit_code"] == 1, d["exit_code"]), default={})
        return {**worst, "tasks": docs}

    @property
    def summary(self) -> Any:
        """The run's outcome for the exit code: the worst of the tasks' summaries (None before any stopped)."""
        done = [s for s in self.summaries.values() if s is not None]
        return max(done, key=lambda s: (s.exit_code == 1, s.exit_code)) if done else None

    # tasks -------------------------------------------------------------------------------------------------
    def _task(self, tid: str) -> Task:
        with self.lock:
            task = self.tasks.get(tid)
        if task is None:
            raise UnknownTask(tid)
        return task

    def task_streams(self, tid: str) -> list[str]:
        with self.lock:
            return [s for s, spec in self.specs.items() if spec.get("task") == tid]

    def tasks_list(self) -> list[dict[str, Any]]:
        with self.lock:
            tasks = list(self.tasks.values())
        return [self._summary(t) for t in tasks]

    def _summary(self, task: Task) -> dict[str, Any]:
        return {"id": task.id, "name": task.topology.name, "labels": task.labels, "ready": task.ready(),
                "default": task.id == self.default, "engines": len(task.topology.nodes) - 1,
                "streams": self.task_streams(task.id)}

    def task(self, tid: str) -> dict[str, Any]:
        task = self._task(tid)
        return {**self._summary(task), **task.describe(), "graph": task.doc}

    def add_task(self, body: dict[str, Any]) -> dict[str, Any]:
        """A new task from `{"id", "graph", "labels"?}`: checked (restricted, as any graph from the network),
        started, stored; nothing else pauses while its models load."""
        tid = task_id(body.get("id"))
        with self.lock:
            if tid in self.tasks:
                raise FileExistsError(f"task {tid!r} exists (PUT /tasks/{tid} replaces it)")
        task = build_task(tid, body.get("graph"), "<task>", restrictions=self.restrictions,
                          labels=body.get("labels"))
        self._start(task)
        with self.changes:
            with self.lock:
                raced = tid in self.tasks
            try:
                if raced:
                    raise FileExistsError(f"task {tid!r} exists (PUT /tasks/{tid} replaces it)")
                self.store.put_task(tid, task.doc, task.labels)  # saved, then in service; a StateError: neither
            except BaseException:
                task.stop()
                raise
            with self.lock:
                self.tasks[tid] = task
        log.info("task %r added", tid)
        return self.task(tid)

    def replace_task(self, tid: str, body: dict[str, Any]) -> dict[str, Any]:
        """Replace a task's graph: the new graph starts beside the old one, then each of the task's streams moves
        over (the old graph ends the stream, so what it had in flight is processed there), then the old graph is
        drained and stopped. The other tasks are not touched."""
        old = self._task(tid)
        labels = body["labels"] if "labels" in body else old.labels
        new = build_task(tid, body.get("graph"), "<task>", restrictions=self.restrictions, labels=labels)
        self._start(new)
        with self.changes:
            try:
                self.store.put_task(tid, new.doc, new.labels)  # saved, then swapped; a StateError: the old one stays
            except BaseException:
                new.stop()
                raise
            with self.lock:
                old = self.tasks.get(tid)
                self.tasks[tid] = new
            streams = self.task_streams(tid)
            for stream in streams:
                self._hand_over(stream, old, new)
        if old is not None:
            old.stop()
            self.summaries[f"{tid} (replaced)"] = old.summary
        log.info("task %r replaced (%d streams moved)", tid, len(streams))
        return self.task(tid)

    def remove_task(self, tid: str, stop_streams: bool = False) -> None:
        """Remove a task; refused while streams use it, unless `stop_streams` (they are removed first)."""
        self._task(tid)
        with self.changes:
            streams = self.task_streams(tid)
            if streams and not stop_streams:
                raise FileExistsError(f"task {tid!r} has {len(streams)} stream(s) ({', '.join(streams[:5])}): "
                                      f"move or remove them first, or DELETE /tasks/{tid}?stop_streams=true")
            for stream in streams:
                self._close(stream)
            self.store.delete_task(tid)  # deleted, then stopped; a StateError: the task stays
            with self.lock:
                task = self.tasks.pop(tid)
                if self.default == tid:
                    self.default = None
        task.stop()
        self.summaries[f"{tid} (removed)"] = task.summary
        log.info("task %r removed", tid)

    # streams -----------------------------------------------------------------------------------------------
    def add_stream(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Checked, saved, then opened; a stream that does not open is taken out of the state file again."""
        stream_id(spec)
        spec = dict(spec)
        spec["task"] = self._task_of(spec)
        trouble = self._task(spec["task"]).trouble()
        if trouble:  # its frames could not get through: refused rather than accepted and starved
            raise Unavailable(f"streams: not accepting streams for task {spec['task']!r} now: {trouble}")
        with self.changes:
            stream = self._admit(spec)
            self.store.put_stream(spec)
            try:
                self._open(spec, None)
            except BaseException:
                self.store.delete_stream(stream)
                raise
        return self.stream(stream)

    def _admit(self, spec: dict[str, Any]) -> str:
        """The checks a new stream passes, from the API or the state file: its id, and its uri (made absolute)."""
        stream = stream_id(spec)
        with self.lock:
            other = clashing(stream, self.specs)
        if other is not None:
            raise FileExistsError(f"stream {stream!r} exists (DELETE it first)" if other == stream else
                                  f"stream {stream!r} would share file names with stream {other!r}")
        check_stream_uri(spec, self.media_roots)
        return stream

    def _task_of(self, spec: dict[str, Any]) -> str:
        """The task a stream spec names, or the default task; a one-line error if there is none."""
        tid = spec.get("task", self.default)
        if tid is None:
            raise GraphflowError("task: this service has no default task; name one of "
                                 f"{', '.join(sorted(self.tasks)) or '(none yet: POST /tasks first)'}")
        task_id(tid, "task")
        with self.lock:
            if tid not in self.tasks:
                raise GraphflowError(f"task: no task {tid!r} (tasks: {', '.join(sorted(self.tasks)) or 'none'})")
        return tid

    def _open(self, spec: dict[str, Any], rules: list[dict[str, Any]] | None) -> None:
        """Start decoding a stream in its task (a restored spec without a task goes to the default one)."""
        stream = spec["id"]
        spec = {**spec, "task": spec.get("task") or self.default}
        task = self._task(spec["task"]) if spec["task"] else None
        if task is None:
            raise GraphflowError("task: none named and no default task")
        entry = _source_entry(spec)
        if self.evidence is not None:  # the source keeps its recent packets, for clips cut without re-encoding
            entry.setdefault("keep_packets_s", self.evidence.keep_packets_s())
        task.command(task.roles.source, "add_source", {"entry": entry})
        with self.lock:
            self.specs[stream] = spec
            self.meters.setdefault(stream, StreamMeter())
            if rules is not None:
                self.rules_of[stream] = rules
        if rules is not None and task.roles.rule is not None:
            task.command(task.roles.rule, "set_rules", {"stream": stream, "rules": rules})

    def _close(self, stream: str) -> None:
        """Deleted from the state file, then stopped; when the file refuses the change the stream goes on."""
        self.store.delete_stream(stream)
        with self.lock:
            spec = self.specs.pop(stream)
            self.rules_of.pop(stream, None)
        task = self._task(spec["task"])
        task.command(task.roles.source, "remove_source", {"stream": stream})

    def _hand_over(self, stream: str, old: Task | None, new: Task) -> None:
        """Move a stream from `old` to `new` (call under `changes`): `old` ends it (its frames in flight are
        finished there), `new` opens it with the stream's rules."""
        with self.lock:
            spec = {**self.specs[stream], "task": new.id}
            rules = self.rules_of.get(stream)
        if old is not None and old.alive():
            old.command(old.roles.source, "remove_source", {"stream": stream})
        self._open(spec, rules)

    def remove_stream(self, stream: str) -> None:
        with self.changes:
            with self.lock:
                if stream not in self.specs:
                    raise KeyError(stream)
            self._close(stream)

    def update_stream(self, stream: str, changes: dict[str, Any]) -> dict[str, Any]:
        """`PUT /streams/{id}`: today only `{"task": ID}`, moving the stream to another task (its rules go along,
        and are checked by the new task's rule engine)."""
        unknown = set(changes) - {"task"}
        if unknown or "task" not in changes:
            raise GraphflowError(f"streams: only 'task' can be changed (got {', '.join(sorted(unknown)) or 'nothing'})")
        tid = task_id(changes["task"], "task")
        with self.lock:
            target = self.tasks.get(tid)
        if target is None:
            raise GraphflowError(f"task: no task {tid!r} (tasks: {', '.join(sorted(self.tasks)) or 'none'})")
        with self.changes:
            with self.lock:
                if stream not in self.specs:
                    raise KeyError(stream)
                current = self.specs[stream]["task"]
            if current != target.id:
                with self.lock:
                    moved = {**self.specs[stream], "task": target.id}
                self.store.put_stream(moved)  # saved, then moved; a StateError: it stays where it is
                self._hand_over(stream, self.tasks.get(current), target)
        return self.stream(stream)

    def stream_ended(self, stream: str) -> None:
        """Its end reached a tap: every engine upstream in that task has freed its state for it."""
        with self.lock:
            if stream not in self.specs:
                self.meters.pop(stream, None)
                self.meter_task.pop(stream, None)
                self.previews.forget(stream)

    def _source_state(self, task: Task, stream: str) -> dict[str, Any]:
        stats = task.stats().get(task.roles.source, {})
        return ((stats.get("metrics") or {}).get("sources") or {}).get(stream, {})

    def source_state(self, stream: str) -> dict[str, Any]:
        """What the stream's source engine reports of it (state, error, frames kept…); {} if not known."""
        with self.lock:
            spec = self.specs.get(stream)
            task = self.tasks.get(spec["task"]) if spec else None
        return self._source_state(task, stream) if task else {}

    def _drops(self, task: Task, stream: str) -> int:
        """Frames of `stream` dropped on the way by a drop policy (frames thinned by its `fps` are not drops)."""
        return sum(int((s.get("dropped_streams") or {}).get(stream, 0)) for s in task.stats().values())

    def _watch_lag(self, tid: str, stats: dict[str, dict[str, Any]]) -> None:
        """At each stats interval of task `tid`: which of its streams cannot keep up (dropping frames, or late); one
        log line when a stream starts lagging and one when it keeps up again."""
        now = time.monotonic()
        with self.lock:
            mine = {s: self.meters[s] for s, spec in self.specs.items() if spec.get("task") == tid and s in self.meters}
        for stream, meter in mine.items():
            change = meter.watch(now, sum(int((s.get("dropped_streams") or {}).get(stream, 0)) for s in stats.values()))
            if change is True:
                log.warning("stream %r is lagging: the graph cannot keep up with it (%d frames dropped so far, "
                            "p50 latency %s ms)", stream, meter.drops, meter.percentiles()["p50"])
            elif change is False:
                log.warning("stream %r keeps up again (%d frames dropped in all)", stream, meter.drops)

    def stream(self, stream: str) -> dict[str, Any]:
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
            spec, meter = self.specs[stream], self.meters.get(stream) or StreamMeter()
            task = self.tasks.get(spec["task"])
        src = self._source_state(task, stream) if task else {}
        state, error = health(task, src.get("state", "connecting"), src.get("error", ""))
        if state == "running" and meter.lagging:
            state = "lagging"
        return {"id": stream, "uri": redact(spec["uri"]), "task": spec["task"], "state": state,
                "frames": meter.frames, "fps": round(meter.fps(time.monotonic()), 2),
                "drops": self._drops(task, stream) if task else 0,
                "events": meter.events, "latency_ms": meter.percentiles(), "error": redact(error)}

    def streams(self) -> list[dict[str, Any]]:
        with self.lock:
            ids = list(self.specs)
        return each_stream(ids, self.stream)

    def rules(self, stream: str) -> list[dict[str, Any]]:
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
            task = self.tasks.get(self.specs[stream]["task"])
            own = self.rules_of.get(stream)
        return own if own is not None else task.graph_rules() if task else []

    def set_rules(self, stream: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Checked, saved, then applied; rules the engine refuses after all are taken out of the state file again."""
        with self.lock:
            if stream not in self.specs:
                raise KeyError(stream)
            task = self.tasks.get(self.specs[stream]["task"])
        if task is None or task.roles.rule is None:
            raise GraphflowError(f"this stream's task ({self.specs[stream]['task']}) has no rule engine")
        task.check_rules(rules)  # the class names too: a misspelt one would never fire
        with self.changes:
            with self.lock:
                before = self.rules_of.get(stream)
            self.store.set_rules(stream, rules)
            try:
                task.command(task.roles.rule, "set_rules", {"stream": stream, "rules": rules})
            except BaseException:
                self.store.set_rules(stream, before)
                raise
            with self.lock:
                self.rules_of[stream] = rules
        return rules

    # the service as a whole --------------------------------------------------------------------------------
    def default_task(self) -> Task:
        if self.default is None:
            raise UnknownTask("default (this service has no default task: GET /tasks)")
        return self._task(self.default)

    def graph(self) -> dict[str, Any]:
        return self.default_task().describe()

    def graph_png(self, tid: str | None = None) -> bytes:
        return graph_png((self._task(tid) if tid else self.default_task()).topology)

    def engine_stats(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Each task's engines' stats (task → engine → stats)."""
        with self.lock:
            tasks = list(self.tasks.values())
        return {t.id: t.stats() for t in tasks}

    def healthy(self) -> bool:
        """Every task's graph runs and none has an engine gone for good (one restarting is still healthy)."""
        with self.lock:
            tasks = list(self.tasks.values())
        return not any(t.broken() for t in tasks)

    def ready(self) -> bool:
        return not self.not_ready()

    def not_ready(self) -> str:
        """Why some task cannot take streams now (starting, stopped, an engine down), "" when every one can."""
        with self.lock:
            tasks = list(self.tasks.values())
        return "; ".join(why for why in (t.trouble() for t in tasks) if why)

    def events(self, stream: str | None, kind: str | None, since: float | None, limit: int,
               task: str | None = None) -> list[dict[str, Any]]:
        self.flush_events()
        return self.store.events(stream, kind, since, limit, task)

    def event(self, eid: str) -> dict[str, Any]:
        """One event by its id, with the paths of its evidence files that exist now."""
        self.flush_events()
        found = self.store.event(eid)
        if found is None:
            raise UnknownEvent(eid)
        return found

    def evidence_file(self, eid: str, kind: str) -> Path:
        """The file of one kind of an event's evidence; UnknownEvent when there is none (yet)."""
        if self.evidence is None or kind not in KINDS:
            raise UnknownEvent(f"{eid}/{kind}")
        path = self.evidence.path(eid, kind)
        if not path.is_file():
            raise UnknownEvent(f"{eid}/{kind}")
        return path

    def _request_clip(self, task: str, stream: str, start: float, end: float, path: Path) -> None:
        t = self._task(task)
        t.command(t.roles.source, "clip", {"stream": stream, "start": start, "end": end, "path": str(path)})

    def metrics(self) -> tuple[bytes, str]:
        from graphflow.serve.metrics import render

        return render(self)

    # the taps ----------------------------------------------------------------------------------------------
    def observe(self, msg: Message, task: str) -> None:
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
            self.meter_task[msg.stream] = task
        if events and self.evidence is not None:
            alarms = self.evidence.offer(task, msg, [ev for ev in events if ev.get("alarm", True) is not False])
            events = alarms + [ev for ev in events if ev.get("alarm", True) is False]
        if events:
            ts = capture or time.time()
            rows = [(ts, msg.stream, str(ev.get("event", ev.get("kind", "event"))), ev, task) for ev in events]
            with self.lock:
                self.pending.extend(rows)
                flush = len(self.pending) >= 100
            self.feed.publish([{"stream": s, "task": t, "kind": k, "seq": msg.seq, "event": ev}
                               for _, s, k, ev, t in rows])
            if flush:
                self.flush_events()

    def flush_events(self) -> None:
        """Save the pending events; when the state file refuses them they are counted in `unsaved_events` (they
        were delivered live already)."""
        with self.lock:
            rows, self.pending = self.pending, []
        try:
            self.store.add_events(rows)
        except StateError as exc:
            self.unsaved_events += len(rows)
            log.error("%s", exc)


def health(task: Task | None, state: str, error: str) -> tuple[str, str]:
    """A stream's state and error as its task's health changes them: a stream still being read is `failed` once
    an engine is gone for good or the graph stopped (its frames go nowhere), `stalled` while an engine restarts."""
    if task is None or state in ("ended", "failed", "stopped"):
        return state, error
    broken = task.broken()
    if broken:
        return "failed", broken
    down = task.down()
    if down:
        return "stalled", f"task {task.id!r}: {next(iter(down.values()))[1]}"
    return state, error


def _source_entry(spec: dict[str, Any]) -> dict[str, Any]:
    """A stream spec as its task's decode engine takes it (the binding to the task is the service's own)."""
    return {k: v for k, v in spec.items() if k != "task"}

