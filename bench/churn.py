"""Churn: `graphflow serve` keeps 8 live streams while a client adds and removes streams continuously; nothing may
crash, hang, fail or leak, and the steady streams must not slow down.

Usage: python bench/churn.py [--cycles 500] [--rate 2] [--quick] [--fps 2.5] [--keep]
Builds its own graph (decode → infer (YOLOX-Nano, letterbox, 1 thread) → track → rule (a line) → publish: events
to JSON lines, and each frame's record with its per-engine times to a second file) in a temporary folder, starts
`graphflow serve` on a free 127.0.0.1 port with a temporary state file and a real RTSP server (gst-rtsp-server run by
the system Python, serving graphs/data/demo.mp4; left out with a note when it is not installed).

The 8 steady streams are files played in real time and looped (one of them from the RTSP server), as cameras are, at
`--fps` 2.5: enough for counting people, and 20 detections a second take about a fifth of one core, so the 2-core
machine the figures come from keeps headroom for the churned streams and its other jobs, and a latency measured is the
pipeline's, not a backlog's.

Phases:
- warm-up: the steady streams and `--warmup-cycles` add/remove cycles (one-time costs such as the RTSP demuxer, ONNX
  Runtime's buffers for larger batches and the allocator's pools belong in the baseline), then a `--baseline` window
  without churn: RSS, open fds and threads of the service's process tree.
- rounds, until `--cycles` cycles are done and at least `--rounds` rounds, each of three windows in an order that
  rotates from round to round, with `--gap` s after each window left out of the figures:
  - steady (`--window`/2 s): the 8 streams alone;
  - churn (`--window` s): `--rate` add/remove cycles started a second (2: a camera added and another removed every
    half second, sustained), alternating a file and the RTSP source, two churned streams alive at a time: POST,
    poll the stream every 0.1 s until its first frame reaches the end of the graph, DELETE the oldest. The rate is
    fixed so that the load offered does not depend on how fast the service answers;
  - static (`--window`/2 s): the same extra load kept still: a file and an RTSP stream added before the window (once
    both delivered a frame) and removed after it.
  Every request has a timeout (a timeout counts as hung).
- settle: waits until every engine's `streams_held` is back to what it held with the steady streams only, then
  samples resources again (RSS also along the churn: its slope over the second half tells a leak from warm-up).
- metrics: 24 more streams (32 in all, at a low fps), 50 timed scrapes of `GET /metrics`.

A steady frame's latency runs from its capture to its last engine stamp (the end of the graph), read from the frames
file; a window holds the frames captured in it. The ratio held against the target is the median over rounds of a
round's churn p95 over its steady p95: the three windows of a round lie within a minute, so they share the machine's
other load, and a round in which that load changed does not move the median. Also printed: the p95 over all frames of
each kind, the service's own histogram (`graphflow_stream_latency_seconds`, interpolated within its buckets), churn vs
static (the cost of adding and removing, apart from the cost of two more streams), where the time goes per engine, and
POST → first frame at the end of the graph (from the frames file). Prints a table and a final `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "graphs" / "data" / "demo.mp4"
STEADY = 8
EXTRA = 24  # streams added for the /metrics measurement (32 in all)
POOL = 2  # churned streams alive at once (and extra streams of a static window)
POLL_S = 0.1  # how often a new stream is polled for its first frame
FRAMES = "frames.jsonl"  # every frame's record with its per-engine times, written by the graph
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-gi (GstRtspServer) is installed for Debian's Python
RTSP_SERVER = '''
import sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer

Gst.init(None)
server = GstRtspServer.RTSPServer(address="127.0.0.1", service=sys.argv[1])
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f'( filesrc location="{sys.argv[2]}" ! qtdemux ! rtph264pay name=pay0 pt=96 )')
server.get_mount_points().add_factory("/cam", factory)
if not server.attach(None):
    sys.exit("cannot listen")
print("ready", flush=True)
GLib.MainLoop().run()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def churn_graph() -> dict[str, Any]:
    return {"name": "churn", "engines": {
        "src": {"type": "decode", "params": {"sources": [], "retry": 0.2, "retry_max": 1.0}},
        "det": {"type": "infer", "params": {"model": "yolox-nano", "letterbox": True, "conf": 0.3, "threads": 1}},
        "trk": {"type": "track"},
        "zone": {"type": "rule", "params": {"rules": [
            {"id": "door", "kind": "line_cross", "line": [[0.5, 0.0], [0.5, 1.0]], "classes": ["person"]}]}},
        "out": {"type": "publish", "params": {"sinks": [{"kind": "jsonl", "path": "events.jsonl", "what": "events"},
                                                        {"kind": "jsonl", "path": FRAMES, "what": "frames"}]}}},
        "connections": [["src.out", "det.in"], ["det.out", "trk.in"], ["trk.out", "zone.in"], ["zone.out", "out.in"]],
        "settings": {"shutdown_timeout": 20}}


def start_rtsp(port: int) -> subprocess.Popen | None:
    """gst-rtsp-server serving the demo clip at rtsp://127.0.0.1:PORT/cam, or None when it cannot run here."""
    try:
        proc = subprocess.Popen([SYSTEM_PYTHON, "-c", RTSP_SERVER, str(port), str(DEMO)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError:
        return None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    if not ready or proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.communicate()
        return None
    return proc


class Client:
    """Calls the service with a timeout per request and counts what went wrong."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self.requests = self.hung = 0
        self.failed: list[str] = []

    def call(self, method: str, path: str, body: Any = None, expect: tuple[int, ...] = (200, 201, 204)) -> Any:
        """The decoded reply, or None after a hung or failed request (counted)."""
        self.requests += 1
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, text = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read()
        except (TimeoutError, socket.timeout):
            self.hung += 1
            return None
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(getattr(exc, "reason", None), (TimeoutError, socket.timeout)):
                self.hung += 1
            else:
                self.failed.append(f"{method} {path}: {exc}")
            return None
        if status not in expect:
            self.failed.append(f"{method} {path}: {status} {text[:200]!r}")
            return None
        if not text:
            return {}
        return json.loads(text) if text[:1] in b"[{" else text.decode()


def resources(pid: int) -> dict[str, int]:
    """RSS, open fds and threads of the service process and its children."""
    root = psutil.Process(pid)
    rss = fds = threads = 0
    for p in [root] + root.children(recursive=True):
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
            threads += p.num_threads()
        except psutil.Error:
            pass
    return {"rss": rss, "fds": fds, "threads": threads}


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by the service process and its children."""
    root = psutil.Process(pid)
    total = 0.0
    for p in [root] + root.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def median_resources(pid: int, seconds: float, every: float = 1.0) -> dict[str, float]:
    samples = []
    end = time.monotonic() + seconds
    while True:
        samples.append(resources(pid))
        if time.monotonic() >= end:
            break
        time.sleep(every)
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def latency_buckets(text: str, streams: set[str]) -> dict[float, float]:
    """Cumulative counts per upper bound of the latency histogram, summed over `streams`."""
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "graphflow_stream_latency_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_bucket") and s.labels.get("stream") in streams:
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
    return out


def window_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The q-quantile (ms) of what a cumulative histogram gained between two scrapes, linear within a bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, cum in zip(bounds, counts):
        if cum >= rank:
            if bound == float("inf"):
                return round(1000 * lower, 1)
            share = (rank - below) / (cum - below) if cum > below else 1.0
            return round(1000 * (lower + (bound - lower) * share), 1)
        lower, below = bound, cum
    return None


def slope_per_100(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of (cycle, MB) points, in MB per 100 cycles: a leak keeps it above 0."""
    if len(points) < 3:
        return None
    n = len(points)
    mx, my = sum(c for c, _ in points) / n, sum(m for _, m in points) / n
    var = sum((c - mx) ** 2 for c, _ in points)
    return round(100 * sum((c - mx) * (m - my) for c, m in points) / var, 2) if var else None


def held_back(held: dict[str, int | None], warm: dict[str, int | None]) -> bool:
    """Every engine keeps state for no more streams than the live set, and for as many as before the churn (an
    engine that keeps nothing per stream, such as a JSON-lines events sink, holds 0)."""
    return bool(held) and held.keys() == warm.keys() and all(
        n is None or (n <= STEADY and n == warm[e]) for e, n in held.items())


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def frame_log(path: Path, steady: set[str]) -> tuple[list[tuple[float, float, dict[str, float]]], dict[str, float]]:
    """From the frames file: (capture, latency, time per engine) of each steady frame, sorted by capture; and each
    other stream's first frame's time at the end of the graph (wall clock)."""
    frames, first = [], {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            times = rec.get("times") or {}
            capture = times.get("capture")
            if capture is None:
                continue
            stamps = sorted((t, e) for e, t in times.items() if e != "capture")
            if not stamps:
                continue
            if rec["stream"] in steady:
                spent, before = {}, capture
                for t, e in stamps:
                    spent[e], before = t - before, t
                frames.append((capture, stamps[-1][0] - capture, spent))
            elif stamps[-1][0] < first.get(rec["stream"], float("inf")):
                first[rec["stream"]] = stamps[-1][0]
    frames.sort(key=lambda x: x[0])
    return frames, first


def in_window(frames: list[tuple[float, float, dict[str, float]]], t0: float, t1: float) -> list[float]:
    """Latencies of the frames captured in [t0, t1)."""
    captures = [c for c, _, _ in frames]
    return [lat for _, lat, _ in frames[bisect.bisect_left(captures, t0):bisect.bisect_left(captures, t1)]]


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to two decimals, None when either is missing."""
    return round(a / b, 2) if a and b else None


class Pace:
    """Starts of cycles `rate` per second (an offered load, the same for any service speed); a cycle that overran
    its slot delays the next one, never bunches them."""

    def __init__(self, rate: float) -> None:
        self.every, self.next = 1.0 / rate, time.monotonic()

    def wait(self, until: float = float("inf")) -> bool:
        """Sleep until the next start; False when it falls at or after `until`."""
        now = time.monotonic()
        self.next = max(self.next, now)
        if self.next >= until:
            return False
        time.sleep(self.next - now)
        self.next += self.every
        return True


@dataclass
class ChurnState:
    """The churned streams: those alive (oldest first), cycles done, POST times and first frames over the limit."""

    pool: deque[str] = field(default_factory=deque)
    cycles: int = 0
    posted: dict[str, tuple[str, float]] = field(default_factory=dict)  # stream → (file|rtsp, wall time of the POST)
    slow: dict[str, int] = field(default_factory=lambda: {"file": 0, "rtsp": 0})


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args, self.folder = args, folder
        self.clip = folder / "clip.mp4"
        shutil.copy(DEMO, self.clip)
        (folder / "graph.json").write_text(json.dumps(churn_graph()))
        self.rtsp_proc = start_rtsp(port := free_port())
        self.rtsp_url = f"rtsp://127.0.0.1:{port}/cam" if self.rtsp_proc else None
        self.port = free_port()
        self.log = folder / "serve.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "graphflow", "serve", str(folder / "graph.json"),
                                      "--port", str(self.port), "--state", str(folder / "state.db"),
                                      "--media", str(folder)],
                                     cwd=folder, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self.client = Client(f"http://127.0.0.1:{self.port}", args.timeout)
        self.steady = {f"steady{i}" for i in range(STEADY)}
        self.windows: list[dict[str, Any]] = []

    def spec(self, sid: str, rtsp: bool, fps: float) -> dict[str, Any]:
        if rtsp:
            return {"id": sid, "uri": self.rtsp_url, "fps": fps}
        return {"id": sid, "uri": str(self.clip), "fps": fps, "loop": True, "realtime": True}

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        probe = Client(self.client.url, 2)
        while probe.call("GET", "/readyz") is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("the service did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.3)

    def streams(self) -> dict[str, dict[str, Any]]:
        got = self.client.call("GET", "/streams")
        return {s["id"]: s for s in got} if isinstance(got, list) else {}

    def steady_buckets(self) -> dict[float, float]:
        text = self.client.call("GET", "/metrics")
        return latency_buckets(text, self.steady) if isinstance(text, str) else {}

    def held(self) -> dict[str, int | None]:
        got = self.client.call("GET", "/graph") or {}
        return {e: n["stats"].get("streams_held") for e, n in (got.get("engines") or {}).items()}

    def wait_held(self, warm: dict[str, int | None], timeout: float) -> tuple[dict[str, int | None], float]:
        """Polls `GET /graph` until every engine holds what it held with the steady streams only (or `timeout`)."""
        t0 = time.monotonic()
        while True:
            held = self.held()
            if held_back(held, warm):
                return held, time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                return held, time.monotonic() - t0
            time.sleep(0.5)

    def first_frame(self, sid: str, limit: float) -> bool:
        """Polls `sid` every POLL_S s until it has a frame at the end of the graph (False after `limit` s); each poll
        is a request the service answers under the same GIL as its engines, so not more often."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            got = self.client.call("GET", f"/streams/{sid}")
            if got and got.get("frames", 0) > 0:
                return True
            time.sleep(POLL_S)
        return False

    def cycle(self, st: ChurnState) -> None:
        """Add a churned stream (a file, then the RTSP source, alternately), wait for its first frame, remove the
        oldest while more than POOL are alive."""
        i = st.cycles
        st.cycles += 1
        rtsp = bool(self.rtsp_url) and i % 2 == 1
        kind, sid = ("rtsp" if rtsp else "file"), f"churn{i}"
        posted = time.time()
        if self.client.call("POST", "/streams", self.spec(sid, rtsp, self.args.fps)) is not None:
            if not self.first_frame(sid, 5.0 if rtsp else 3.0):
                st.slow[kind] += 1
            st.posted[sid] = (kind, posted)
            st.pool.append(sid)
        while len(st.pool) > POOL:
            self.client.call("DELETE", f"/streams/{st.pool.popleft()}")

    def measured(self, kind: str, rnd: int, work: Callable[[], None]) -> None:
        """Run one window's `work` and record it: wall-clock span, service CPU, load average, latency histogram."""
        h0, cpu0, t0, wall0 = self.steady_buckets(), cpu_seconds(self.proc.pid), time.monotonic(), time.time()
        work()
        seconds, wall1 = time.monotonic() - t0, time.time()
        self.windows.append({"kind": kind, "round": rnd, "t0": wall0, "t1": wall1, "s": seconds,
                             "cpu": cpu_seconds(self.proc.pid) - cpu0, "load": os.getloadavg()[0],
                             "h0": h0, "h1": self.steady_buckets()})

    def run(self) -> dict[str, Any]:
        a = self.args
        self.wait_ready()
        started = time.monotonic()
        for i, sid in enumerate(sorted(self.steady)):
            self.client.call("POST", "/streams", self.spec(sid, bool(self.rtsp_url) and i == 0, a.fps))
        warm = ChurnState()
        pace = Pace(a.rate)
        while warm.cycles < a.warmup_cycles:  # one-time loads happen before the baseline
            pace.wait()
            self.cycle(warm)
        while warm.pool:
            self.client.call("DELETE", f"/streams/{warm.pool.popleft()}")
        time.sleep(max(0.0, a.warmup - (time.monotonic() - started)))
        warm_held = self.held()
        deadline = time.monotonic() + 30
        while not all(n is None or n <= STEADY for n in warm_held.values()) and time.monotonic() < deadline:
            time.sleep(0.5)  # the warm-up's churned streams are still being freed
            warm_held = self.held()

        # baseline resources: no churn
        t_base = time.monotonic()
        base_res: list[dict[str, int]] = []
        while time.monotonic() - t_base < a.baseline:
            base_res.append(resources(self.proc.pid))
            time.sleep(2.0)
        baseline = {k: statistics.median(r[k] for r in base_res) for k in base_res[0]}

        # rounds of steady, churn and static windows
        st = ChurnState()
        peak = resources(self.proc.pid)
        rss_track: list[tuple[int, float]] = [(0, round(peak["rss"] / 2**20, 1))]

        def steady() -> None:
            time.sleep(a.window / 2)

        def churn() -> None:
            nonlocal peak
            end = last_sample = time.monotonic()
            end += a.window
            pace = Pace(a.rate)
            while pace.wait(end) and self.proc.poll() is None:
                self.cycle(st)
                if time.monotonic() - last_sample > 2.0:
                    now = resources(self.proc.pid)
                    peak = {k: max(peak[k], now[k]) for k in peak}
                    rss_track.append((st.cycles, round(now["rss"] / 2**20, 1)))
                    last_sample = time.monotonic()
            while st.pool:
                self.client.call("DELETE", f"/streams/{st.pool.popleft()}")

        kinds = ("steady", "churn", "static")
        rounds = 0
        while (st.cycles < a.cycles or rounds < a.rounds) and self.proc.poll() is None:
            for k in range(len(kinds)):
                kind = kinds[(rounds + k) % len(kinds)]
                if kind == "static":
                    extra = [f"static{rounds}{j}" for j in range(POOL)]
                    for j, sid in enumerate(extra):
                        self.client.call("POST", "/streams", self.spec(sid, bool(self.rtsp_url) and j % 2 == 1, a.fps))
                    for sid in extra:
                        self.first_frame(sid, 5.0)
                    self.measured(kind, rounds, steady)
                    for sid in extra:
                        self.client.call("DELETE", f"/streams/{sid}")
                else:
                    self.measured(kind, rounds, churn if kind == "churn" else steady)
                time.sleep(a.gap)
            rounds += 1
        churn_s = sum(w["s"] for w in self.windows if w["kind"] == "churn")

        # settle: every engine back to the live set, then resources again
        alive_after_churn = self.proc.poll() is None
        held, settle_s = self.wait_held(warm_held, 60)
        live_ids = set(self.streams())
        time.sleep(a.settle)
        after = median_resources(self.proc.pid, a.settle_window) if alive_after_churn else baseline

        # /metrics with 32 streams
        for i in range(EXTRA):
            self.client.call("POST", "/streams", self.spec(f"extra{i}", False, 0.5))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = self.streams()
            if len(got) >= STEADY + EXTRA and all(s["frames"] > 0 for s in got.values()):
                break
            time.sleep(1.0)
        scrape_ms, metrics_streams = [], len(self.streams())
        for _ in range(50):
            t0 = time.perf_counter()
            self.client.call("GET", "/metrics")
            scrape_ms.append(1000 * (time.perf_counter() - t0))
            time.sleep(0.1)
        for i in range(EXTRA):
            self.client.call("DELETE", f"/streams/extra{i}")
        healthy = self.client.call("GET", "/healthz") is not None and self.proc.poll() is None

        latency = self.latency(rounds)
        frames, first = frame_log(self.folder / FRAMES, self.steady)
        ttff: dict[str, list[float]] = {"file": [], "rtsp": []}
        for sid, (kind, posted) in st.posted.items():
            if sid in first:
                ttff[kind].append(1000 * (first[sid] - posted))
        change = {k: round(100 * (after[k] - baseline[k]) / baseline[k], 2) for k in baseline}
        result = {
            "cycles": st.cycles, "rounds": rounds, "churn_s": round(churn_s, 1), "rtsp": bool(self.rtsp_url),
            "crashes": 0 if healthy and alive_after_churn else 1, "hung": self.client.hung,
            "failed": len(self.client.failed), "requests": self.client.requests,
            "baseline": {"rss_mb": round(baseline["rss"] / 2**20, 1), "fds": baseline["fds"],
                         "threads": baseline["threads"]},
            "after": {"rss_mb": round(after["rss"] / 2**20, 1), "fds": after["fds"], "threads": after["threads"]},
            "peak_during_churn": {"rss_mb": round(peak["rss"] / 2**20, 1), "fds": peak["fds"],
                                  "threads": peak["threads"]},
            "change_pct": change,
            "rss_mb_by_cycle": [rss_track[round(k * (len(rss_track) - 1) / 10)] for k in range(11)],
            "streams_held_warm": warm_held, "streams_held_after": held, "settle_s": round(settle_s, 1),
            "live_after": len(live_ids),
            "rss_mb_per_100_cycles_2nd_half": slope_per_100(rss_track[len(rss_track) // 2:]),
            **latency,
            "first_frame_ms": {k: {"n": len(v), "median": pct(v, 0.5), "p95": pct(v, 0.95), "over_limit": st.slow[k]}
                               for k, v in ttff.items()},
            "metrics_ms": {"streams": metrics_streams, "median": pct(scrape_ms, 0.5), "p95": pct(scrape_ms, 0.95)},
            "failures": self.client.failed[:5],
        }
        result["checks"] = {
            "no_crash": result["crashes"] == 0, "no_hung": result["hung"] == 0, "no_failed": result["failed"] == 0,
            "cycles_done": st.cycles >= a.cycles,
            "resources_within_5pct": all(abs(v) <= 5 for v in change.values()),
            "streams_held_back": held_back(held, warm_held) and len(live_ids) == STEADY,
            "steady_p95_le_1.25x": result["steady_p95_ms"]["ratio"] is not None
            and result["steady_p95_ms"]["ratio"] <= 1.25,
            "first_frame_file_p95_lt_1s": bool(ttff["file"]) and pct(ttff["file"], 0.95) < 1000
            and st.slow["file"] == 0,
            "metrics_p95_lt_50ms": metrics_streams >= STEADY + EXTRA and pct(scrape_ms, 0.95) < 50,
        }
        result["ok"] = all(result["checks"].values())
        return result

    def latency(self, rounds: int) -> dict[str, Any]:
        """The steady streams' latency per kind of window: over all its frames, per round, from the service's
        histogram, where the time goes per engine; the service's CPU and the machine's load average."""
        frames, _ = frame_log(self.folder / FRAMES, self.steady)
        kinds = ("steady", "churn", "static")
        pooled: dict[str, list[float]] = {k: [] for k in kinds}
        spent: dict[str, dict[str, float]] = {k: {} for k in kinds}
        hist: dict[str, dict[float, float]] = {k: {} for k in kinds}
        per_round: list[dict[str, float | None]] = [{} for _ in range(rounds)]
        captures = [c for c, _, _ in frames]
        for w in self.windows:
            lats = [1000 * x for x in in_window(frames, w["t0"], w["t1"])]
            pooled[w["kind"]] += lats
            per_round[w["round"]][w["kind"]] = pct(lats, 0.95)
            for _, _, by_engine in frames[bisect.bisect_left(captures, w["t0"]):bisect.bisect_left(captures, w["t1"])]:
                for e, s in by_engine.items():
                    spent[w["kind"]][e] = spent[w["kind"]].get(e, 0.0) + s
            for b, n in w["h1"].items():
                hist[w["kind"]][b] = hist[w["kind"]].get(b, 0.0) + n - w["h0"].get(b, 0.0)

        def median_ratio(a: str, b: str) -> float | None:
            got = [r for r in (ratio(p.get(a), p.get(b)) for p in per_round) if r is not None]
            return round(statistics.median(got), 2) if got else None

        p95 = {k: pct(v, 0.95) for k, v in pooled.items()}
        windows = {k: [w for w in self.windows if w["kind"] == k] for k in kinds}
        return {
            "steady_p95_ms": {**p95, "ratio": median_ratio("churn", "steady"),
                              "ratio_vs_static": median_ratio("churn", "static"),
                              "static_vs_steady": median_ratio("static", "steady"),
                              "pooled_ratio": ratio(p95["churn"], p95["steady"]),
                              "pooled_ratio_vs_static": ratio(p95["churn"], p95["static"]),
                              "by_round": [[p.get(k) for k in kinds] for p in per_round],
                              "histogram": {k: window_quantile({}, h, 0.95) for k, h in hist.items()}},
            "steady_latency_ms": {k: {"frames": len(v), "p50": pct(v, 0.5), "p99": pct(v, 0.99),
                                      "mean_by_engine": {e: round(1000 * s / max(len(v), 1), 1)
                                                         for e, s in spent[k].items()}}
                                  for k, v in pooled.items()},
            "service_cpu_cores": {k: round(sum(w["cpu"] for w in ws) / sum(w["s"] for w in ws), 2) if ws else None
                                  for k, ws in windows.items()},
            "loadavg_1m": {**{k: round(statistics.mean(w["load"] for w in ws), 2) if ws else None
                              for k, ws in windows.items()}, "cores": os.cpu_count()},
        }

    def close(self) -> int | None:
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                code = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            code = self.proc.returncode
        if self.rtsp_proc is not None:
            self.rtsp_proc.kill()
            self.rtsp_proc.communicate()
        return code


def cols(values: Any) -> str:
    """One table cell per window kind."""
    return " ".join(f"{v!s:>36}" for v in values)


def print_table(r: dict[str, Any]) -> None:
    p95, lat = r["steady_p95_ms"], r["steady_latency_ms"]
    kinds = ("steady", "churn", "static")
    rows = [
        ("churn cycles (file/rtsp alternating)",
         f"{r['cycles']} in {r['churn_s']} s of churn, {r['rounds']} rounds"
         + ("" if r["rtsp"] else " (no RTSP server: files only)")),
        ("requests / hung / failed (non-2xx)", f"{r['requests']} / {r['hung']} / {r['failed']}"),
        ("crashes", r["crashes"]),
        ("RSS MB baseline → after (peak)", f"{r['baseline']['rss_mb']} → {r['after']['rss_mb']} "
                                           f"({r['peak_during_churn']['rss_mb']})"),
        ("open fds baseline → after (peak)", f"{r['baseline']['fds']} → {r['after']['fds']} "
                                             f"({r['peak_during_churn']['fds']})"),
        ("threads baseline → after (peak)", f"{r['baseline']['threads']} → {r['after']['threads']} "
                                            f"({r['peak_during_churn']['threads']})"),
        ("change % (rss, fds, threads)", r["change_pct"]),
        ("RSS MB by churn cycle", " ".join(f"{c}:{m}" for c, m in r["rss_mb_by_cycle"])),
        ("RSS slope, 2nd half of churn", f"{r['rss_mb_per_100_cycles_2nd_half']} MB per 100 cycles"),
        ("streams_held warm → after settle", f"{r['streams_held_warm']} → {r['streams_held_after']} "
                                             f"(live {r['live_after']}, {r['settle_s']} s)"),
        ("steady latency ms, window:", cols(kinds)),
        ("  frames", cols(lat[k]["frames"] for k in kinds)),
        ("  p50 / p95 / p99", cols(f"{lat[k]['p50']} / {p95[k]} / {lat[k]['p99']}" for k in kinds)),
        ("  p95, service histogram", cols(p95["histogram"][k] for k in kinds)),
        ("  service CPU (cores)", cols(r["service_cpu_cores"][k] for k in kinds)),
        ("  load average (1 min)", cols(r["loadavg_1m"][k] for k in kinds) + f"  ({r['loadavg_1m']['cores']} cores)"),
        ("  mean ms per engine", cols(" ".join(f"{e}:{v}" for e, v in lat[k]["mean_by_engine"].items())
                                      for k in kinds)),
        ("steady p95 churn / steady", f"×{p95['ratio']} (median of rounds; all frames: ×{p95['pooled_ratio']})"),
        ("steady p95 churn / static", f"×{p95['ratio_vs_static']} (median of rounds; all frames: "
                                      f"×{p95['pooled_ratio_vs_static']})"),
        ("steady p95 static / steady", f"×{p95['static_vs_steady']} (median of rounds)"),
        ("steady p95 ms by round (steady, churn, static)", " ".join(f"{s}/{c}/{t}" for s, c, t in p95["by_round"])),
        ("POST → first frame ms, file", r["first_frame_ms"]["file"]),
        ("POST → first frame ms, rtsp", r["first_frame_ms"]["rtsp"]),
        ("GET /metrics ms", r["metrics_ms"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for name, ok in r["checks"].items():
        print(f"{'check ' + name:<{width}}  {'ok' if ok else 'FAILED'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=500, help="add/remove cycles in the churn windows, at least")
    p.add_argument("--rounds", type=int, default=6, help="rounds of steady, churn and static windows, at least")
    p.add_argument("--window", type=float, default=20.0, help="seconds of a churn window (steady, static: half)")
    p.add_argument("--gap", type=float, default=2.0, help="seconds left out after each window")
    p.add_argument("--quick", action="store_true", help="60 cycles and short windows")
    p.add_argument("--fps", type=float, default=2.5, help="frames per second of each stream")
    p.add_argument("--rate", type=float, default=2.0, help="add/remove cycles started per second")
    p.add_argument("--warmup", type=float, default=40.0, help="seconds from the first stream to the baseline")
    p.add_argument("--warmup-cycles", type=int, default=50, help="add/remove cycles inside the warm-up")
    p.add_argument("--baseline", type=float, default=20.0, help="seconds of resource samples before any churn")
    p.add_argument("--settle", type=float, default=10.0, help="seconds to wait after streams_held is back")
    p.add_argument("--settle-window", type=float, default=20.0, help="seconds of resource samples after settling")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds after which a request counts as hung")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (service log, state, frames)")
    args = p.parse_args()
    if args.quick:
        args.cycles, args.rounds, args.window, args.warmup, args.warmup_cycles = min(args.cycles, 60), 3, 12.0, 25.0, 10
        args.baseline, args.settle, args.settle_window = 10.0, 5.0, 5.0
    folder = Path(tempfile.mkdtemp(prefix="graphflow-churn-"))
    bench = Bench(args, folder)
    if bench.rtsp_url is None:
        print("note: gst-rtsp-server for the system Python is missing: RTSP sources left out "
              "(apt-get install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good python3-gi)")
    try:
        result = bench.run()
    finally:
        code = bench.close()
    result["exit_code"] = code
    print_table(result)
    if not result["ok"]:
        print("service log, last lines:\n" + "\n".join(bench.log.read_text().splitlines()[-30:]))
    if args.keep:
        print(f"kept: {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
