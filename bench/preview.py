"""Cost of live previews: the demo pipeline's throughput with 4 dashboard viewers open against none, in one run.

Usage: python bench/preview.py [--streams 4] [--phase 8] [--rounds 2] [--max-fps 5] [--max-width 640]
The demo graph (decode → preprocess → infer in a process → track → line rule) runs on N looping copies of the demo
video, decoded flat out, and ends in a tap engine that offers every frame to graphflow.serve.previews.Previews, as the
service's tap does. A real uvicorn serves the dashboard's preview routes; phases alternate between no viewer and
4 MJPEG clients (one per stream, each a real HTTP connection). Throughput is frames per second reaching the tap;
the target is ratio = viewers / none ≥ 0.9. Prints a table and a final `RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from graphflow import graph
from graphflow import runtime
from graphflow.serve.api import create_app
from graphflow.engine import Engine
from graphflow.message import Message
from graphflow.serve.previews import Previews

TARGET = 0.9


class PreviewTap(Engine):
    """The end of the bench graph: counts frames and offers each to the bench's Previews (set before the run)."""

    outputs = ()
    previews: Previews
    frames = 0

    def process(self, msg: Message) -> None:
        PreviewTap.frames += 1
        PreviewTap.previews.offer(msg)


class Streams:
    """The part of graphflow.serve.api.Controller that the preview routes use: the streams that exist, and previews."""

    def __init__(self, ids: list[str], previews: Previews) -> None:
        self.ids, self.previews = set(ids), previews

    def stream(self, stream: str) -> dict[str, Any]:
        if stream not in self.ids:
            raise KeyError(stream)
        return {"id": stream}


class Viewer(threading.Thread):
    """One dashboard viewer: reads a stream's MJPEG until told to stop, counting the JPEGs that arrive."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.jpegs, self.stopping = url, 0, threading.Event()

    def run(self) -> None:
        with urllib.request.urlopen(self.url, timeout=30) as response:
            while not self.stopping.is_set():
                line = response.readline()
                if not line:
                    return
                if line.lower().startswith(b"content-length:"):
                    response.readline()
                    response.read(int(line.split(b":")[1]))
                    self.jpegs += 1


def bench_doc(streams: int) -> dict[str, Any]:
    """The demo graph on `streams` looping sources, its file sink replaced by the preview tap."""
    from pipeline import demo_doc

    doc = demo_doc(streams, None, "process", Path("unused.jsonl"))
    for source in doc["engines"]["src"]["params"]["sources"]:
        source["loop"] = True
    del doc["engines"]["out"]
    doc["engines"]["tap"] = {"type": f"{__name__}:PreviewTap"}
    doc["connections"] = [c for c in doc["connections"] if "out.in" not in c] + [["zone.out", "tap.in"]]
    return doc


def serve(controller: Streams) -> tuple[Any, str]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(controller), log_level="warning", timeout_graceful_shutdown=1))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def phase(seconds: float, viewers: list[Viewer]) -> dict[str, float]:
    """Frames per second at the tap over `seconds`, with `viewers` connected (started here, stopped after)."""
    for v in viewers:
        v.start()
    time.sleep(min(1.0, seconds / 4))  # connections open and the first previews flow before counting
    frames0, encoded0, t0 = PreviewTap.frames, PreviewTap.previews.encoded, time.monotonic()
    time.sleep(seconds)
    frames, encoded, wall = PreviewTap.frames - frames0, PreviewTap.previews.encoded - encoded0, time.monotonic() - t0
    jpegs = sum(v.jpegs for v in viewers)
    for v in viewers:
        v.stopping.set()
    for v in viewers:
        v.join(10)
    return {"fps": frames / wall, "encoded_per_s": encoded / wall, "viewer_jpegs": jpegs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--phase", type=float, default=8.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="none/viewers phase pairs")
    parser.add_argument("--max-fps", type=float, default=5.0)
    parser.add_argument("--max-width", type=int, default=640)
    args = parser.parse_args()

    ids = [f"cam{i + 1}" for i in range(args.streams)]
    PreviewTap.previews = Previews(max_fps=args.max_fps, max_width=args.max_width)
    server, url = serve(Streams(ids, PreviewTap.previews))
    launcher = runtime.Launcher(graph.build(bench_doc(args.streams), "bench-preview"))
    run = threading.Thread(target=launcher.run, daemon=True)
    run.start()
    deadline = time.monotonic() + 120
    while PreviewTap.frames < 20 * args.streams:  # warm-up: model loaded, every engine flowing
        if time.monotonic() > deadline or not run.is_alive():
            raise SystemExit(f"the pipeline did not start: {launcher.errors}")
        time.sleep(0.2)

    rows = []
    try:
        for r in range(args.rounds):
            for viewers in (0, 4):
                clients = [Viewer(f"{url}/streams/{ids[k % len(ids)]}/preview.mjpg") for k in range(viewers)]
                rows.append({"round": r + 1, "viewers": viewers, **phase(args.phase, clients)})
                print(f"round {r + 1}  viewers {viewers}:  {rows[-1]['fps']:7.1f} frames/s at the tap  "
                      f"{rows[-1]['encoded_per_s']:5.1f} JPEG/s encoded  {rows[-1]['viewer_jpegs']:4d} JPEGs received",
                      flush=True)
    finally:
        launcher.on_signal(15)
        run.join(60)
        server.should_exit = True
        PreviewTap.previews.close()

    none = sum(r["fps"] for r in rows if r["viewers"] == 0) / args.rounds
    watched = sum(r["fps"] for r in rows if r["viewers"] == 4) / args.rounds
    ratio = watched / none if none else 0.0
    encode_ms = 1000 * PreviewTap.previews.encode_s / max(PreviewTap.previews.encoded, 1)
    print(f"\n{'viewers':>8} {'frames/s':>9}\n{0:>8} {none:9.1f}\n{4:>8} {watched:9.1f}\nratio {ratio:.3f} "
          f"(target ≥ {TARGET}); {encode_ms:.1f} ms per preview (scale + draw + JPEG)")
    print("RESULT " + json.dumps({"streams": args.streams, "viewers": 4, "max_fps": args.max_fps,
                                  "max_width": args.max_width, "fps_none": round(none, 2),
                                  "fps_viewers": round(watched, 2), "ratio": round(ratio, 3),
                                  "encode_ms": round(encode_ms, 2), "target": TARGET, "ok": ratio >= TARGET,
                                  "phases": rows}))
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    # run as the module `preview` (this file's folder is on sys.path), so that the graph's type
    # "preview:PreviewTap" and this code share one PreviewTap class and its Previews
    import preview

    sys.exit(preview.main())
