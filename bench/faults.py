"""Fault matrix: runs graphs through the `graphflow launch` command while faults are injected and checks the
delivery contract — a frame accepted is delivered or counted as lost, and every run ends.

Usage: python bench/faults.py [--only NAME[,NAME]] [--guard 90]

Each scenario writes its graph (absolute paths only) and a small module of test engines into a temporary folder,
runs `python -m graphflow launch graph.json --stats stats.json -q` with that folder on PYTHONPATH, injects its fault
(a slow consumer across processes, SIGKILL, SIGSTOP, a full tmpfs, a redis-server stopped and started again, bad media,
several streams into a slow consumer) and reads back what reached the end of the graph. Per scenario it prints:
frames sent, delivered (unique), counted lost (the run's own `lost`/`dropped`/`discarded` figures), duplicated,
silent losses (sent − delivered − counted, never negative), hung (the run outlived its guard and was killed) and the
exit code; then `RESULT {json}`. Counted figures are read from the `--stats` file, so a run that dies before writing
it shows none counted."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

ENGINES = '''
"""Engines the fault matrix puts into its graphs."""
import json, os, signal, time
from pathlib import Path

from graphflow import Engine, Param


class Recorder(Engine):
    """Appends `stream seq` per message to `path` (flushed per line), taking `delay` seconds per message."""
    outputs = ()
    path = Param(str)
    delay = Param(float, 0.0)

    def setup(self):
        self.file = open(self.path, "a", buffering=1)

    def process(self, msg):
        time.sleep(self.delay)
        self.file.write(f"{msg.stream} {msg.seq}\\n")

    def teardown(self):
        self.file.close()


class Fault(Engine):
    """Passes messages on; at frame `at` (once per run, remembered in `marker`) sends `sig` to `target`:
    `self` (this engine's process) or `children` (every child process of this process)."""
    at = Param(int, 10)
    sig = Param(str, "SIGKILL")
    target = Param(str, "self")
    marker = Param(str)

    def process(self, msg):
        if msg.seq == self.at and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            sig = getattr(signal, self.sig)
            if self.target == "self":
                os.kill(os.getpid(), sig)
            else:
                import psutil
                for child in psutil.Process().children():
                    os.kill(child.pid, sig)
        self.send(msg)


def slow_copy(msg):
    """A `map` function: the message, after 2 ms of work."""
    time.sleep(0.002)
    return msg


def no_tracks(msg):
    """A `map` function: the frame with an empty track list, for a rule engine after it."""
    msg.data["tracks"] = []
    return msg
'''


@dataclass
class Outcome:
    scenario: str
    sent: int
    delivered: int = 0
    counted_lost: int = 0
    duplicated: int = 0
    silent_lost: int = 0
    hung: bool = False
    exit_code: int | None = None
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def counted(stats: dict[str, Any]) -> int:
    """Messages the run itself reports as not delivered: the run's `lost` (every reason, engines' own counts
    included), what drop policies dropped, and frames a source skipped as unreadable (`corrupt`)."""
    total = int(stats.get("lost") or 0)
    for s in stats.get("engines", {}).values():
        total += int(s.get("dropped") or 0)
        metrics = s.get("metrics") or {}
        total += int(metrics.get("corrupt") or 0) if isinstance(metrics.get("corrupt"), int) else 0
    return total


def sent_by(stats: dict[str, Any], engine: str, planned: int) -> int:
    """What the source engine says it sent (a stopped run sends less than planned), else what was planned."""
    reported = (stats.get("engines", {}).get(engine) or {}).get("sent")
    return int(reported) if isinstance(reported, int) and reported > 0 else planned


def recorded(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.append((parts[0], int(parts[1])))
    return out


class Run:
    """One scenario's folder, graph and `graphflow launch` process."""

    def __init__(self, name: str, guard: float) -> None:
        self.name, self.guard = name, guard
        self.dir = Path(tempfile.mkdtemp(prefix=f"faults-{name}-"))
        (self.dir / "faultengines.py").write_text(ENGINES)
        self.out = self.dir / "out.txt"

    def launch(self, doc: dict[str, Any], during: Callable[[subprocess.Popen], None] | None = None) -> Outcome:
        path = self.dir / "graph.json"
        path.write_text(json.dumps(doc))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.dir), str(ROOT)]))
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "graphflow", "launch", str(path), "--stats",
                                 str(self.dir / "stats.json"), "-q"], cwd=self.dir, env=env,
                                stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.txt", "w"))
        if during is not None:
            during(proc)
        hung = False
        try:
            proc.wait(self.guard)
        except subprocess.TimeoutExpired:
            hung = True
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        o = Outcome(self.name, 0, hung=hung, exit_code=None if hung else proc.returncode,
                    wall_s=round(time.monotonic() - t0, 2))
        stats_file = self.dir / "stats.json"
        try:
            stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        except json.JSONDecodeError:
            stats = {}
        o.counted_lost = counted(stats)
        o.extra["stats"] = stats
        return o

    def finish(self, o: Outcome, sent: int, got: list[tuple[str, int]] | None = None) -> Outcome:
        got = recorded(self.out) if got is None else got
        unique = set(got)
        stats = o.extra.pop("stats", {})
        sent = sent_by(stats, "src", sent) if o.extra.pop("sent_from_stats", False) else sent
        o.sent, o.delivered, o.duplicated = sent, len(unique), len(got) - len(unique)
        o.silent_lost = max(0, sent - o.delivered - o.counted_lost)
        o.extra["stderr_tail"] = (self.dir / "stderr.txt").read_text()[-400:] if (self.dir / "stderr.txt").exists() else ""
        return o

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def make_video(path: Path, frames: int, size: tuple[int, int] = (320, 240), fps: int = 25) -> None:
    import av

    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = size[0], size[1], "yuv420p"
        st.options = {"g": "25"}
        for i in range(frames):
            img = np.full((size[1], size[0], 3), (i * 7) % 256, np.uint8)
            img[:, (i * 3) % size[0]] = 255
            for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)


def recorder(run: Run, delay: float = 0.0, placement: str = "thread") -> dict[str, Any]:
    return {"type": "faultengines:Recorder", "placement": placement, "params": {"path": str(run.out), "delay": delay}}


def slow_consumer(guard: float, shape: list[int], count: int, consumer: str) -> Outcome:
    run = Run(f"slow-{consumer}-{'x'.join(map(str, shape[:2]))}", guard)
    doc = {"engines": {"src": {"type": "source", "placement": "process", "params": {"count": count, "shape": shape}},
                       "out": recorder(run, 0.1, consumer)},
           "connections": [["src.out", "out.in"]], "settings": {"shutdown_timeout": 5}}
    try:
        return run.finish(run.launch(doc), count)
    finally:
        run.close()


def source_killed(guard: float) -> Outcome:
    """decode (process, restart on-failure) of a 150-frame file; its process is SIGKILLed at frame 60."""
    run = Run("source-killed", guard)
    video = run.dir / "clip.mp4"
    make_video(video, 150)
    doc = {"engines": {
        "src": {"type": "decode", "placement": "process", "restart": "on-failure", "max_restarts": 2,
                "params": {"sources": [{"id": "cam", "uri": str(video)}]}},
        "kill": {"type": "faultengines:Fault", "params": {"at": 60, "target": "children",
                                                         "marker": str(run.dir / "killed")}},
        "out": recorder(run)},
        "connections": [["src.out", "kill.in"], ["kill.out", "out.in"]], "settings": {"shutdown_timeout": 5}}
    try:
        return run.finish(run.launch(doc), 150)
    finally:
        run.close()


def middle_killed(guard: float) -> Outcome:
    """A process engine between source and sink SIGKILLs itself at frame 40 and is not restarted."""
    run = Run("middle-killed", guard)
    doc = {"engines": {"src": {"type": "source", "params": {"count": 100, "rate": 200.0}},
                       "mid": {"type": "faultengines:Fault", "placement": "process",
                               "params": {"at": 40, "marker": str(run.dir / "killed")}},
                       "out": recorder(run)},
           "connections": [["src.out", "mid.in"], ["mid.out", "out.in"]], "settings": {"shutdown_timeout": 5}}
    try:
        o = run.finish(run.launch(doc), 100)
        o.extra["clean_exit_despite_loss"] = o.exit_code == 0 and o.delivered < 100
        return o
    finally:
        run.close()


def stalled(guard: float) -> Outcome:
    """A process engine SIGSTOPs itself at frame 20; the bench sends SIGTERM 4 s later: the run must still end."""
    run = Run("stalled", guard)
    doc = {"engines": {"src": {"type": "source", "params": {"count": 100, "rate": 100.0}},
                       "mid": {"type": "faultengines:Fault", "placement": "process",
                               "params": {"at": 20, "sig": "SIGSTOP", "marker": str(run.dir / "stopped")}},
                       "out": recorder(run)},
           "connections": [["src.out", "mid.in"], ["mid.out", "out.in"]],
           "settings": {"shutdown_timeout": 3}}

    def term_later(proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 20
        while not (run.dir / "stopped").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(4)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    try:
        o = run.launch(doc, term_later)
        o.extra["sent_from_stats"] = True  # the stop ends the source early: what it sent is what counts
        o = run.finish(o, 100)
        err = (run.dir / "stderr.txt").read_text() if (run.dir / "stderr.txt").exists() else ""
        o.extra["stall_reported"] = "stall" in err.lower() or "watchdog" in err.lower() or "holds" in err.lower()
        return o
    finally:
        run.close()


def disk_full(guard: float) -> Outcome:
    """publish writes jsonl and an annotated video into a 64 KiB tmpfs; the jsonl must hold only whole lines."""
    run = Run("disk-full", guard)
    mnt = run.dir / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        run.close()
        return Outcome("disk-full", 0, extra={"skipped": "cannot mount a tmpfs (needs root)"})
    try:
        doc = {"engines": {"src": {"type": "source", "params": {"count": 1500, "shape": [120, 160, 3]}},
                           "out": {"type": "publish", "params": {"sinks": [
                               {"kind": "video", "path": str(mnt / "v.mp4"), "fps": 10},
                               {"kind": "jsonl", "path": str(mnt / "out.jsonl")}]}},
                           "tap": recorder(run)},
               "connections": [["src.out", "out.in"], ["src.out", "tap.in"]], "settings": {"shutdown_timeout": 5}}
        o = run.launch(doc)
        lines = (mnt / "out.jsonl").read_bytes().split(b"\n") if (mnt / "out.jsonl").exists() else [b""]
        torn = 0
        whole = 0
        for line in lines[:-1]:
            try:
                json.loads(line)
                whole += 1
            except ValueError:
                torn += 1
        if lines[-1]:
            torn += 1
        got = [("s0", i) for i in range(whole)]
        o = run.finish(o, 1500, got)
        o.extra.update(torn_lines=torn, clean_exit_despite_loss=o.exit_code == 0 and whole < 1500)
        return o
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        run.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_outage(guard: float) -> Outcome:
    """A redis sink (frames) while redis-server is stopped for 3 s mid-run and started again on the same port."""
    if shutil.which("redis-server") is None:
        return Outcome("broker-outage", 0, extra={"skipped": "redis-server not installed"})
    run = Run("broker-outage", guard)
    port = free_port()

    def redis() -> subprocess.Popen:
        # what the broker accepted survives its own restart (fsync'd append-only file): losses are then graphflow's
        p = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "yes",
                              "--appendfsync", "always", "--dir", str(run.dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return p
    server = redis()
    sink = {"kind": "redis", "url": f"redis://127.0.0.1:{port}/0", "stream": "faults", "what": "frames",
            "maxlen": 100000}
    doc = {"engines": {"src": {"type": "source", "params": {"count": 200, "rate": 40.0}},
                       "out": {"type": "publish", "params": {"sinks": [sink]}}},
           "connections": [["src.out", "out.in"]], "settings": {"shutdown_timeout": 15}}
    spool_doc = json.loads(json.dumps(doc))
    spool_doc["engines"]["out"]["params"]["sinks"][0]["spool"] = str(run.dir / "spool")

    def outage(proc: subprocess.Popen) -> None:
        nonlocal server
        time.sleep(1.5)
        server.terminate()
        server.wait()
        time.sleep(3)
        server = redis()
    try:
        o = run.launch(spool_doc, outage)
        if "unknown key" in (run.dir / "stderr.txt").read_text():  # no spool in this version: plain sink
            o = run.launch(doc, outage)
            o.extra["spool"] = False
        import redis as redis_py

        entries = redis_py.Redis(port=port).xrange("faults")
        got = []
        for _, fields in entries:
            got.append((fields[b"stream"].decode(), int(fields[b"seq"])))
        return run.finish(o, 200, got)
    finally:
        server.terminate()
        server.wait()
        run.close()


def huge_image(guard: float) -> Outcome:
    """An image folder with a 20000×20000 PNG between two good images: the good ones arrive, the run ends."""
    from PIL import Image

    run = Run("huge-image", guard)
    folder = run.dir / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(folder / "a.png")
    Image.new("L", (20000, 20000)).save(folder / "b.png")
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(folder / "c.png")
    doc = {"engines": {"src": {"type": "decode", "params": {"sources": [{"id": "dir", "uri": str(folder)}]}},
                       "out": recorder(run)},
           "connections": [["src.out", "out.in"]], "settings": {"shutdown_timeout": 5}}
    try:
        return run.finish(run.launch(doc), 3)
    finally:
        run.close()


def absurd_start(guard: float) -> Outcome:
    """A source with `"start": 1e300`: a one-line error before anything starts, or a failed source; never a hang."""
    run = Run("absurd-start", guard)
    video = run.dir / "clip.mp4"
    make_video(video, 20)
    doc = {"engines": {"src": {"type": "decode", "params": {"sources": [{"id": "cam", "uri": str(video),
                                                                          "start": 1e300}]}},
                       "out": recorder(run)},
           "connections": [["src.out", "out.in"]]}
    try:
        o = run.finish(run.launch(doc), 0)
        err = (run.dir / "stderr.txt").read_text()
        o.extra["traceback"] = "Traceback" in err
        return o
    finally:
        run.close()


def fair_drop(guard: float, consumer: str) -> Outcome:
    """4 streams into a slow consumer on a `drop_oldest` edge: each stream's share of what arrives."""
    run = Run(f"fair-drop-{consumer}", guard)
    doc = {"engines": {"src": {"type": "source", "params": {"count": 60, "streams": 4, "rate": 30.0,
                                                            "shape": [240, 320, 3]}},
                       "out": recorder(run, 0.02, consumer)},
           "connections": [{"from": "src.out", "to": "out.in", "policy": "drop_oldest", "capacity": 4}],
           "settings": {"shutdown_timeout": 5}}
    try:
        o = run.finish(run.launch(doc), 240)
        per = Counter(s for s, _ in recorded(run.out))
        mean = sum(per.values()) / 4 if per else 0
        o.extra["per_stream"] = dict(sorted(per.items()))
        o.extra["worst_share_dev"] = round(max(abs(per.get(f"s{i}", 0) - mean) / mean for i in range(4)), 3) if mean else None
        return o
    finally:
        run.close()


def child_pids(proc: subprocess.Popen) -> list[int]:
    """The engine processes a `graphflow launch`/`serve` process started (multiprocessing spawns them)."""
    import psutil

    try:
        return [c.pid for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    except psutil.Error:
        return []


def kill_child_later(delay: float) -> Callable[[subprocess.Popen], None]:
    """A `during` hook: SIGKILL the launch's engine process `delay` seconds after it appeared."""
    def kill(proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 30
        while not child_pids(proc) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(delay)
        for pid in child_pids(proc):
            os.kill(pid, signal.SIGKILL)
    return kill


def restart_loss(guard: float) -> Outcome:
    """800 frames through a process engine with `restart: on-failure`, SIGKILLed from outside mid-run: what its
    dead incarnation held (in its inbox, on the connections to and from it) is delivered or counted."""
    run = Run("restart-loss", guard)
    doc = {"engines": {"src": {"type": "source", "params": {"count": 800, "rate": 200.0, "shape": [120, 160, 3]}},
                       "mid": {"type": "map", "placement": "process", "restart": "on-failure",
                               "params": {"function": "faultengines:slow_copy"}},
                       "out": recorder(run)},
           "connections": [["src.out", "mid.in"], ["mid.out", "out.in"]], "settings": {"shutdown_timeout": 5}}
    try:
        return run.finish(run.launch(doc, kill_child_later(4.0)), 800)
    finally:
        run.close()


def http(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, None if body is None else json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def service_killed(guard: float, restart: str) -> Outcome:
    """A real `graphflow serve`: decode → a process `map` → rule (→ the tap, and a recorder); one 150-frame stream
    at its pace; the map's process is SIGKILLed after 2 s. Its restart policy is `restart`: `never` leaves the
    service not ready until stopped (exit 1), `on-failure` brings it back. Counted from `serve --stats`."""
    run = Run(f"svc-{'dead-engine' if restart == 'never' else 'restart-loss'}", guard)
    video = run.dir / "clip.mp4"
    make_video(video, 150)
    doc = {"engines": {"src": {"type": "decode", "params": {"sources": []}},
                       "mid": {"type": "map", "placement": "process", "restart": restart,
                               "params": {"function": "faultengines:no_tracks"}},
                       "zone": {"type": "rule", "params": {"rules": []}},
                       "rec": recorder(run)},
           "connections": [["src", "mid"], ["mid", "zone"], ["zone", "rec"]], "settings": {"shutdown_timeout": 5}}
    (run.dir / "graph.json").write_text(json.dumps(doc))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(run.dir), str(ROOT)]))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "graphflow", "serve", str(run.dir / "graph.json"), "--port",
                             str(port), "--state", str(run.dir / "state.db"), "--stats", str(run.dir / "stats.json")],
                            cwd=run.dir, env=env, stdout=subprocess.DEVNULL, stderr=open(run.dir / "stderr.txt", "w"))
    o = Outcome(run.name, 150)
    try:
        deadline = time.monotonic() + guard
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if http(base + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        http(base + "/streams", "POST", {"id": "cam", "uri": str(video), "realtime": True})
        time.sleep(2.0)
        for pid in child_pids(proc):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        status, body = http(base + "/readyz")
        o.extra["readyz_after_kill"] = f"{status} {(body or {}).get('reason', '')[:60]}"
        while time.monotonic() < deadline:  # until the source has sent every frame (or could not)
            sent = (http(base + "/graph")[1]["engines"]["src"]["stats"] or {}).get("sent") or 0
            if sent >= 150:
                break
            time.sleep(0.3)
        time.sleep(1.0)
        o.extra["stream_state"] = http(base + "/streams/cam")[1].get("state")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        o.hung = True
        proc.kill()
        proc.wait()
    o.exit_code = None if o.hung else proc.returncode
    o.wall_s = round(time.monotonic() - t0, 2)
    try:
        stats = json.loads((run.dir / "stats.json").read_text())
    except (OSError, ValueError):
        stats = {}
    o.counted_lost = counted(stats)
    o.extra["stats"] = stats
    try:
        return run.finish(o, 150)
    finally:
        run.close()


SCENARIOS: dict[str, Callable[[float], Outcome]] = {
    "slow-xproc": lambda g: slow_consumer(g, [1080, 1920, 3], 30, "thread"),
    "slow-xproc-4k": lambda g: slow_consumer(g, [2160, 3840, 3], 12, "process"),
    "source-killed": source_killed,
    "middle-killed": middle_killed,
    "restart-loss": restart_loss,
    "svc-dead-engine": lambda g: service_killed(g, "never"),
    "svc-restart-loss": lambda g: service_killed(g, "on-failure"),
    "stalled": stalled,
    "disk-full": disk_full,
    "broker-outage": broker_outage,
    "huge-image": huge_image,
    "absurd-start": absurd_start,
    "fair-drop-thread": lambda g: fair_drop(g, "thread"),
    "fair-drop-process": lambda g: fair_drop(g, "process"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    ap.add_argument("--guard", type=float, default=90.0, help="seconds after which a run counts as hung")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    outcomes = []
    for name in names:
        o = SCENARIOS[name](args.guard)
        outcomes.append(o)
        print(f"{o.scenario:<18} sent={o.sent:<4} delivered={o.delivered:<4} counted_lost={o.counted_lost:<4} "
              f"dup={o.duplicated:<4} silent={o.silent_lost:<4} hung={str(o.hung):<5} exit={o.exit_code} "
              f"{o.wall_s:>6.1f}s", flush=True)
    print()
    print(f"{'scenario':<18} {'sent':>5} {'deliv':>6} {'counted':>8} {'dup':>5} {'silent':>7} {'hung':>5} {'exit':>5}  notes")
    for o in outcomes:
        notes = {k: v for k, v in o.extra.items() if k != "stderr_tail"}
        print(f"{o.scenario:<18} {o.sent:>5} {o.delivered:>6} {o.counted_lost:>8} {o.duplicated:>5} {o.silent_lost:>7} "
              f"{str(o.hung):>5} {str(o.exit_code):>5}  {json.dumps(notes) if notes else ''}")
    shares = [o.extra["worst_share_dev"] for o in outcomes if o.extra.get("worst_share_dev") is not None]
    result = {"silent_lost": sum(o.silent_lost for o in outcomes), "hangs": sum(o.hung for o in outcomes),
              "duplicates": sum(o.duplicated for o in outcomes),
              "worst_fair_share_dev": max(shares) if shares else None,
              "scenarios": {o.scenario: {k: v for k, v in asdict(o).items() if k not in ("scenario", "extra")}
                            | {k: v for k, v in o.extra.items() if k != "stderr_tail"} for o in outcomes}}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
