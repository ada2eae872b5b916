"""Tasks: several graphs in one `graphflow serve`, changed live; and what sharing a detector between tasks saves.

Usage: python bench/tasks.py [--cycles 200] [--quick] [--fps 2.5] [--share-only | --churn-only]

Sharing (`--share-s` s measured after `--warm-s` s, A and B alternated `--share-rounds` times): 8 live streams (the
demo clip, looped in real time at `--share-fps`) through
  A. one service with two tasks of 4 streams each whose infer engines are defined alike (so they share one detector),
  B. two services, each with one of the tasks and its 4 streams (each its own detector),
the same graph otherwise (decode → infer (YOLOX-Nano, letterbox, 1 thread, max_batch 8, max_wait_ms `--share-wait-ms`)
→ track → rule). The streams' frames are not in step (each starts when added), so a batch gathers the frames that
arrive within the wait: 300 ms of a 500 ms interval, the share a 20 ms wait is of a 30 fps camera's interval; the
offered load (16 frames/s) stays under the CPU's capacity, so throughput measures delivery, not saturation. Compared: infer's mean batch size (from /metrics), RSS of the service process trees, and throughput (frames
at the end of the graphs per second). Targets: batch ×≥1.8, RSS ×≤0.6, throughput no lower.

Churn: one service with 3 tasks — `doors` and `aisles` define their detector alike (shared), `gate` another (its own,
conf 0.4) — and 8 steady live streams (3/3/2), at `--fps`. A client then runs `--cycles` cycles at `--rate` a
second, each: add a 4th task `extra` (defined like `doors`: it joins the shared detector), add a stream to it and
wait for its first frame, replace `extra` (a moved line) and time how long its stream takes to produce a frame
again, move the `mover` stream between `doors` and `aisles`, remove `extra` with its stream. Rounds of three windows
(steady, churn, static: a 4th task and its stream kept still, as in bench/churn.py) give the steady streams' p95
latency (the service's histogram) in each; the ratio held to the target is the median over rounds of churn p95 over
steady p95. RSS, fds and threads of the service tree are compared with a warmed-up baseline (after `--warmup` cycles).
Every request has a timeout (a timeout counts as hung); at the end the service is stopped and its exit code says
whether anything was lost (0: nothing; 3: losses or errors, named in its log).
Prints a table and a final `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from churn import Client, Pace, free_port, latency_buckets, median_resources, ratio, window_quantile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "graphs" / "data" / "demo.mp4"


def task_graph(line_x: float = 0.5, conf: float = 0.3, batch: int = 8, wait_ms: float = 40.0) -> dict[str, Any]:
    return {"engines": {
        "src": {"type": "decode", "params": {"retry": 0.2, "retry_max": 1.0}},
        "det": {"type": "infer", "params": {"model": "yolox-nano", "letterbox": True, "conf": conf, "threads": 1,
                                            "max_batch": batch, "max_wait_ms": wait_ms}},
        "trk": {"type": "track"},
        "zone": {"type": "rule", "params": {"rules": [
            {"id": "door", "kind": "line_cross", "line": [[line_x, 0.0], [line_x, 1.0]], "classes": ["person"]}]}}},
        "connections": [["src.out", "det.in"], ["det.out", "trk.in"], ["trk.out", "zone.in"]],
        "settings": {"shutdown_timeout": 20}}


class Service:
    """One `graphflow serve` of the given graph files on a free port, in `folder`."""

    def __init__(self, folder: Path, graphs: dict[str, dict[str, Any]], timeout: float, media: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for name, doc in graphs.items():
            (folder / f"{name}.json").write_text(json.dumps(doc))
        self.port = free_port()
        self.log = folder / "serve.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "graphflow", "serve",
                                      *[str(folder / f"{n}.json") for n in graphs], "--port", str(self.port),
                                      "--state", str(folder / "state.db"), "--media", str(media)],
                                     cwd=folder, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self.client = Client(f"http://127.0.0.1:{self.port}", timeout)
        deadline = time.monotonic() + 180
        probe = Client(self.client.url, 2)
        while probe.call("GET", "/readyz") is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the service did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def metric(self, name: str, label: str = "stream") -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = self.client.call("GET", "/metrics")
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text if isinstance(text, str) else ""):
            for s in family.samples:
                if s.name == name:
                    out[s.labels.get(label, "") + "/" + s.labels.get("task", "")] = s.value
        return out

    def frames(self) -> float:
        return sum(self.metric("graphflow_stream_frames_total").values())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def clip_spec(clip: Path, sid: str, task: str, fps: float) -> dict[str, Any]:
    return {"id": sid, "uri": str(clip), "fps": fps, "loop": True, "realtime": True, "task": task}


# sharing ----------------------------------------------------------------------------------------------------------
def measure_sharing(services: list[Service], warm_s: float, seconds: float) -> dict[str, float]:
    time.sleep(warm_s)
    f0, t0 = sum(s.frames() for s in services), time.monotonic()
    rss = [median_resources(s.proc.pid, seconds, 2.0)["rss"] for s in services]
    f1, t1 = sum(s.frames() for s in services), time.monotonic()
    batches = [v for s in services for k, v in s.metric("graphflow_infer_batch_size", "engine").items()
               if k.startswith("det/")]
    return {"batch": round(statistics.mean(batches), 2) if batches else 0.0, "rss_mb": round(sum(rss) / 2**20, 1),
            "fps": round((f1 - f0) / (t1 - t0), 2)}


def sharing(args: argparse.Namespace, folder: Path, clip: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"shared": [], "separate": []}
    for rnd in range(args.share_rounds):
        for layout in (("shared", "separate") if rnd % 2 == 0 else ("separate", "shared")):
            base = folder / f"share{rnd}-{layout}"
            a, b = task_graph(wait_ms=args.share_wait_ms), task_graph(0.4, wait_ms=args.share_wait_ms)
            if layout == "shared":
                services = [Service(base, {"a": a, "b": b}, args.timeout, clip.parent)]
                owners = [services[0]] * 2
            else:
                services = [Service(base / "a", {"a": a}, args.timeout, clip.parent),
                            Service(base / "b", {"b": b}, args.timeout, clip.parent)]
                owners = services
            for i in range(8):
                task = "ab"[i // 4]
                owners[i // 4].client.call("POST", "/streams", clip_spec(clip, f"cam{i}", task, args.share_fps))
            got = measure_sharing(services, args.warm_s, args.share_s)
            codes = [s.stop() for s in services]
            runs[layout].append({**got, "exit": max(codes)})
            print(f"sharing round {rnd} {layout:<8}: batch {got['batch']:5.2f}  RSS {got['rss_mb']:7.1f} MB  "
                  f"{got['fps']:6.2f} frames/s", flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("batch", "rss_mb", "fps")} for k, v in runs.items()}
    return {"rounds": runs, "median": med,
            "batch_ratio": ratio(med["shared"]["batch"], med["separate"]["batch"]),
            "rss_ratio": ratio(med["shared"]["rss_mb"], med["separate"]["rss_mb"]),
            "fps_ratio": ratio(med["shared"]["fps"], med["separate"]["fps"])}


# churn ------------------------------------------------------------------------------------------------------------
class Churn:
    def __init__(self, args: argparse.Namespace, folder: Path, clip: Path) -> None:
        self.args, self.clip = args, clip
        self.svc = Service(folder, {"doors": task_graph(), "aisles": task_graph(0.4),
                                    "gate": task_graph(0.6, conf=0.4)}, args.timeout, clip.parent)
        self.c = self.svc.client
        self.steady = [f"steady{i}" for i in range(8)]
        self.cycles, self.back_s, self.slow_back, self.moves = 0, [], 0, 0
        self.windows: list[dict[str, Any]] = []

    def frames_of(self, sid: str) -> int:
        got = self.c.call("GET", f"/streams/{sid}")
        return int(got["frames"]) if got else -1

    def wait_frames(self, sid: str, above: int, limit: float) -> float | None:
        """Seconds until `sid` has more than `above` frames at the end of its graph (None after `limit`)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if self.frames_of(sid) > above:
                return time.monotonic() - t0
            time.sleep(0.1)
        return None

    def cycle(self) -> None:
        i = self.cycles
        self.cycles += 1
        c = self.c
        if c.call("POST", "/tasks", {"id": "extra", "graph": task_graph()}) is None:
            return
        c.call("POST", "/streams", clip_spec(self.clip, "extra-cam", "extra", self.args.fps))
        self.wait_frames("extra-cam", 0, 5.0)
        before = self.frames_of("extra-cam")
        if c.call("PUT", "/tasks/extra", {"graph": task_graph(0.45 + 0.01 * (i % 5))}) is not None:
            back = self.wait_frames("extra-cam", before, 10.0)
            self.back_s.append(back if back is not None else 10.0)
            self.slow_back += back is None or back > 2.0
        c.call("PUT", "/streams/mover", {"task": "aisles" if i % 2 == 0 else "doors"})
        self.moves += 1
        c.call("DELETE", "/tasks/extra?stop_streams=true", expect=(204,))

    def buckets(self) -> dict[float, float]:
        text = self.c.call("GET", "/metrics")
        return latency_buckets(text, set(self.steady)) if isinstance(text, str) else {}

    def window(self, kind: str, rnd: int, seconds: float, work: Any = None) -> None:
        h0, t0 = self.buckets(), time.monotonic()
        pace = Pace(self.args.rate)
        while time.monotonic() - t0 < seconds:
            if work is None:
                time.sleep(0.2)
            elif pace.wait(t0 + seconds):
                work()
        self.windows.append({"kind": kind, "round": rnd, "p95": window_quantile(h0, self.buckets(), 0.95)})

    def static_on(self) -> None:
        self.c.call("POST", "/tasks", {"id": "still", "graph": task_graph()})
        self.c.call("POST", "/streams", clip_spec(self.clip, "still-cam", "still", self.args.fps))
        self.wait_frames("still-cam", 0, 5.0)

    def run(self) -> dict[str, Any]:
        a, c = self.args, self.c
        for i, sid in enumerate(self.steady):
            c.call("POST", "/streams", clip_spec(self.clip, sid, ("doors", "aisles", "gate")[i % 3], a.fps))
        c.call("POST", "/streams", clip_spec(self.clip, "mover", "doors", a.fps))
        for _ in range(a.warmup):
            self.cycle()
        time.sleep(5)
        base = median_resources(self.svc.proc.pid, a.baseline)
        rnd = 0
        while self.cycles < a.cycles + a.warmup or rnd < a.rounds:
            order = ["steady", "churn", "static"][rnd % 3:] + ["steady", "churn", "static"][:rnd % 3]
            for kind in order:
                if kind == "steady":
                    self.window(kind, rnd, a.window / 2)
                elif kind == "churn":
                    self.window(kind, rnd, a.window, self.cycle)
                else:
                    self.static_on()
                    self.window(kind, rnd, a.window / 2)
                    c.call("DELETE", "/tasks/still?stop_streams=true", expect=(204,))
                time.sleep(a.gap)
            rnd += 1
            print(f"churn round {rnd}: {self.cycles - a.warmup} cycles, "
                  f"{ {w['kind']: w['p95'] for w in self.windows if w['round'] == rnd - 1} }", flush=True)
        time.sleep(5)
        after = median_resources(self.svc.proc.pid, a.baseline)
        alive = self.svc.proc.poll() is None
        code = self.svc.stop()
        return self.summary(base, after, alive, code, rnd)

    def summary(self, base: dict[str, float], after: dict[str, float], alive: bool, code: int,
                rounds: int) -> dict[str, Any]:
        by = {k: [w for w in self.windows if w["kind"] == k] for k in ("steady", "churn", "static")}
        per_round = [ratio(next((w["p95"] for w in by["churn"] if w["round"] == r), None),
                           next((w["p95"] for w in by["steady"] if w["round"] == r), None)) for r in range(rounds)]
        vs_static = [ratio(next((w["p95"] for w in by["churn"] if w["round"] == r), None),
                           next((w["p95"] for w in by["static"] if w["round"] == r), None)) for r in range(rounds)]
        change = {k: round(100 * (after[k] - base[k]) / base[k], 2) if base[k] else 0.0 for k in base}
        back = sorted(self.back_s)
        return {"cycles": self.cycles - self.args.warmup, "moves": self.moves, "rounds": rounds,
                "crashes": int(not alive), "hung": self.c.hung, "failed": len(self.c.failed),
                "failures": self.c.failed[:5], "exit_code": code,
                "change_pct": change, "baseline": base, "after": after,
                "p95_ms": {k: [w["p95"] for w in v] for k, v in by.items()},
                "ratio": statistics.median([r for r in per_round if r]) if any(per_round) else None,
                "ratio_vs_static": statistics.median([r for r in vs_static if r]) if any(vs_static) else None,
                "replaced_back_s": {"median": round(back[len(back) // 2], 2) if back else None,
                                    "max": round(back[-1], 2) if back else None, "over_2s": self.slow_back}}


def print_table(r: dict[str, Any]) -> None:
    if "sharing" in r:
        s = r["sharing"]["median"]
        print("\nsharing (medians)      shared    separate   ratio   target")
        for key, name, target in (("batch", "infer mean batch", "≥ 1.8"), ("rss_mb", "RSS MB", "≤ 0.6"),
                                  ("fps", "frames/s", "≥ 1.0")):
            ratio_key = {"batch": "batch_ratio", "rss_mb": "rss_ratio", "fps": "fps_ratio"}[key]
            print(f"  {name:<20} {s['shared'][key]:>8} {s['separate'][key]:>10}   {r['sharing'][ratio_key]!s:>5}   "
                  f"{target}")
    if "churn" in r:
        c = r["churn"]
        print(f"\nchurn: {c['cycles']} cycles ({c['moves']} moves) in {c['rounds']} rounds; crashes {c['crashes']}, "
              f"hung {c['hung']}, failed {c['failed']}, exit code {c['exit_code']}")
        print(f"  RSS / fds / threads change: {c['change_pct']}")
        print(f"  steady p95 ms: steady {c['p95_ms']['steady']} churn {c['p95_ms']['churn']} "
              f"static {c['p95_ms']['static']}")
        print(f"  churn ÷ steady (median of rounds) {c['ratio']} (target ≤ 1.25); churn ÷ static {c['ratio_vs_static']}")
        print(f"  replaced task's stream back after {c['replaced_back_s']} (target < 2 s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rate", type=float, default=0.5, help="churn cycles started a second")
    p.add_argument("--window", type=float, default=60.0, help="seconds of a churn window (steady, static: half)")
    p.add_argument("--gap", type=float, default=3.0)
    p.add_argument("--baseline", type=float, default=10.0)
    p.add_argument("--fps", type=float, default=2.5)
    p.add_argument("--share-fps", type=float, default=2.0)
    p.add_argument("--share-wait-ms", type=float, default=300.0,
                   help="infer's max_wait_ms in the sharing runs: 0.6 of the frame interval, as 20 ms is at 30 fps")
    p.add_argument("--share-rounds", type=int, default=2)
    p.add_argument("--warm-s", type=float, default=15.0)
    p.add_argument("--share-s", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--quick", action="store_true", help="a short run: 20 cycles, 2 rounds, one sharing round")
    p.add_argument("--share-only", action="store_true")
    p.add_argument("--churn-only", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.cycles, a.warmup, a.rounds, a.window, a.share_rounds, a.warm_s, a.share_s = 20, 3, 2, 30.0, 1, 10.0, 15.0
    folder = Path(tempfile.mkdtemp(prefix="graphflow-tasks-"))
    clip = folder / "clip.mp4"
    shutil.copy(DEMO, clip)
    result: dict[str, Any] = {}
    try:
        if not a.churn_only:
            result["sharing"] = sharing(a, folder, clip)
        if not a.share_only:
            result["churn"] = Churn(a, folder / "churn", clip).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(result)
    sh, ch = result.get("sharing"), result.get("churn")
    ok = (sh is None or ((sh["batch_ratio"] or 0) >= 1.8 and (sh["rss_ratio"] or 9) <= 0.6
                         and (sh["fps_ratio"] or 0) >= 0.97)) and (
        ch is None or (ch["crashes"] == ch["hung"] == ch["failed"] == 0 and ch["exit_code"] == 0
                       and all(abs(v) <= 5 for v in ch["change_pct"].values()) and (ch["ratio"] or 9) <= 1.25
                       and ch["replaced_back_s"]["over_2s"] == 0))
    slim = {k: ({kk: vv for kk, vv in v.items() if kk not in ("rounds", "baseline", "after")} if isinstance(v, dict)
                else v) for k, v in result.items()}
    print("RESULT " + json.dumps({**slim, "ok": ok}))


if __name__ == "__main__":
    main()
