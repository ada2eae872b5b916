"""Many live previews at once: the preview work left unbounded (the old behaviour) against the budget (a total
encode rate shared by the watched streams, at most `max_queued` frame copies waiting, a cap on MJPEG viewers);
`rate_only` is the budget without the viewer cap.

Usage: python bench/preview_budget.py [--streams 50] [--viewers 50] [--fps 10] [--phase 6] [--rounds 2]
A tap thread offers frames of N streams at a fixed rate (each stream `--fps`), as the service's tap does at the end
of the graph; its lag (how late each offer finishes against its schedule) is what the pipeline would feel. The
frames are the demo video's, decoded by PyAV and scaled to 1920×1080 as a camera's would be. V MJPEG viewers (one
per stream, real HTTP connections to a real uvicorn serving graphflow.serve.api) watch, and a prober times
`GET /streams`. Phases alternate the variants (each its own Previews and app, all started up front), with
medians over the rounds. Prints a table and a final `RESULT {json}` line; ratio = unbounded / budget."""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from graphflow.message import Message
from graphflow.serve.api import create_app
from graphflow.serve.live import LiveFeed
from graphflow.serve.previews import Previews

ROOT = Path(__file__).resolve().parents[1]
UNBOUNDED = {"total_fps": 1e9, "max_queued": 10**9}  # the previews as they were: only the per-stream cap


class Streams:
    """The part of graphflow.serve.api.Controller the preview routes and `GET /streams` use."""

    def __init__(self, ids: list[str], previews: Previews) -> None:
        self.ids, self.previews, self.feed = ids, previews, LiveFeed()

    def stream(self, stream: str) -> dict[str, Any]:
        if stream not in self.ids:
            raise KeyError(stream)
        return {"id": stream, "state": "running"}

    def streams(self) -> list[dict[str, Any]]:
        return [self.stream(s) for s in self.ids]


def camera_frame() -> np.ndarray:
    with av.open(str(ROOT / "graphs" / "data" / "demo.mp4")) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="bgr24")
    return np.asarray(Image.fromarray(frame).resize((1920, 1080), Image.BILINEAR))


def serve(app: Any) -> tuple[Any, str]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


class Viewer(threading.Thread):
    """One MJPEG viewer: reads until told to stop; `refused` when the service answered 503."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.jpegs, self.refused, self.stopping = url, 0, False, threading.Event()

    def run(self) -> None:
        try:
            response = urllib.request.urlopen(self.url, timeout=5)
        except urllib.error.HTTPError as exc:
            self.refused = exc.code == 503
            return
        with response:
            while not self.stopping.is_set():
                try:
                    line = response.readline()
                except OSError:  # no picture for a while: the phase is over
                    return
                if not line:
                    return
                if line.lower().startswith(b"content-length:"):
                    response.readline()
                    response.read(int(line.split(b":")[1]))
                    self.jpegs += 1


def tap(previews: Previews, ids: list[str], image: np.ndarray, fps: float, seconds: float) -> list[float]:
    """Offer frames of every stream at `fps` each for `seconds`; each offer's lag behind its schedule (s)."""
    period = 1.0 / (fps * len(ids))
    lags, start, k = [], time.perf_counter(), 0
    while True:
        due = start + k * period
        if due - start > seconds:
            return lags
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        stream = ids[k % len(ids)]
        previews.offer(Message(stream=stream, seq=k // len(ids), data={"color": "bgr", "tracks": []},
                               arrays={"image": image}))
        lags.append(time.perf_counter() - due)
        k += 1


def prober(url: str, stopping: threading.Event, out: list[float]) -> None:
    while not stopping.is_set():
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"{url}/streams", timeout=60) as response:
            response.read()
        out.append(time.perf_counter() - t0)
        stopping.wait(0.2)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))] if values else float("nan")


def phase(name: str, previews: Previews, url: str, ids: list[str], image: np.ndarray, args: Any) -> dict[str, Any]:
    viewers = [Viewer(f"{url}/streams/{ids[k % len(ids)]}/preview.mjpg") for k in range(args.viewers)]
    for v in viewers:
        v.start()
    time.sleep(1.0)
    rss0, encoded0, peak, copies = rss_mb(), previews.encoded, [0.0], [0.0]
    stopping, api = threading.Event(), []
    probe = threading.Thread(target=prober, args=(url, stopping, api), daemon=True)
    probe.start()

    def watch_rss() -> None:
        while not stopping.wait(0.1):
            peak[0] = max(peak[0], rss_mb() - rss0)
            waiting = sum(1 for state in list(previews.streams.values()) if state.job is not None)
            copies[0] = max(copies[0], waiting * image.nbytes / 2**20)
    threading.Thread(target=watch_rss, daemon=True).start()
    t0 = time.perf_counter()
    lags = tap(previews, ids, image, args.fps, args.phase)
    wall = time.perf_counter() - t0
    stopping.set()
    probe.join(60)
    for v in viewers:
        v.stopping.set()
    for v in viewers:
        v.join(30)
    return {"variant": name, "tap_lag_p95_s": p95(lags), "api_p95_s": p95(api),
            "encoded_per_s": (previews.encoded - encoded0) / wall, "rss_peak_mb": peak[0],
            "copies_peak_mb": copies[0],
            "viewers_refused": sum(v.refused for v in viewers)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--viewers", type=int, default=50)
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second of each stream")
    parser.add_argument("--phase", type=float, default=6.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    ids = [f"cam{i + 1}" for i in range(args.streams)]
    image = camera_frame()
    setups = {}
    for name, options, cap in (("unbounded", UNBOUNDED, 10**6), ("rate_only", {}, 10**6), ("budget", {}, None)):
        previews = Previews(**options)
        app = create_app(Streams(ids, previews), **({"max_viewers": cap} if cap else {}))
        setups[name] = (previews, *serve(app))
    rows = []
    try:
        for r in range(args.rounds):
            for name, (previews, _, url) in setups.items():
                rows.append({"round": r + 1, **phase(name, previews, url, ids, image, args)})
                row = rows[-1]
                print(f"round {r + 1} {name:<9}: tap lag p95 {row['tap_lag_p95_s']:7.3f} s  GET /streams p95 "
                      f"{row['api_p95_s']:6.3f} s  {row['encoded_per_s']:5.1f} JPEG/s  RSS +{row['rss_peak_mb']:5.0f} MB"
                      f"  copies {row['copies_peak_mb']:4.0f} MB"
                      f"  {row['viewers_refused']} viewers refused", flush=True)
    finally:
        for previews, server, _ in setups.values():
            server.should_exit = True
            previews.close()

    keys = ("tap_lag_p95_s", "api_p95_s", "encoded_per_s", "rss_peak_mb", "copies_peak_mb", "viewers_refused")
    medians = {name: {k: statistics.median(r[k] for r in rows if r["variant"] == name) for k in keys}
               for name in setups}
    print(f"\n{'variant':<10} {'tap lag p95 s':>14} {'API p95 s':>10} {'JPEG/s':>7} {'RSS +MB':>8} {'copies MB':>10} "
          f"{'refused':>8}")
    for name, m in medians.items():
        print(f"{name:<10} {m['tap_lag_p95_s']:14.3f} {m['api_p95_s']:10.3f} {m['encoded_per_s']:7.1f} "
              f"{m['rss_peak_mb']:8.0f} {m['copies_peak_mb']:10.0f} {m['viewers_refused']:8.0f}")
    ratios = {k: round(medians["unbounded"][k] / medians["budget"][k], 2) if medians["budget"][k] else None
              for k in ("tap_lag_p95_s", "api_p95_s", "copies_peak_mb")}
    print("RESULT " + json.dumps({"streams": args.streams, "viewers": args.viewers, "fps": args.fps,
                                  "medians": medians, "ratio_unbounded_over_budget": ratios, "phases": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
