"""Cost of moving one frame from one process to another: graphflow's shared-memory channel against
raw ZeroMQ bytes, multiprocessing.Queue, and a plain in-process copy (the floor).

Usage: python bench/channel.py [--quick]
Each transport streams frames from a producer process to a consumer process as fast as the consumer
takes them; the per-hop time is the consumer's steady-state interval between frames (1 / frames per
second; median of ten chunks after warm-up). Producers send frames that already exist (graphflow: a pool slot stamped with the frame
number; the others: one prepared buffer), so what is timed is the hop, not making the frame. The
consumer checks every frame's stamp. Prints a table and a final `RESULT {json}` line; ratios are
against raw ZeroMQ in the same run."""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from graphflow import Engine, Message, Param, graph, runtime

SIZES = {"640x360": (360, 640, 3), "1280x720": (720, 1280, 3), "1920x1080": (1080, 1920, 3),
         "3840x2160": (2160, 3840, 3)}


class Producer(Engine):
    """Sends `count` frames of `shape` (a pool slot each, stamped with the frame number), or 200-byte messages."""

    inputs = ()
    count = Param(int, 100)
    shape = Param(list, [])

    def generate(self):
        for i in range(self.count):
            msg = Message("s0", i, data={"pad": "x" * 160} if not self.shape else {})
            if self.shape:
                frame = self.alloc(tuple(self.shape), np.uint8)
                frame[0, 0, :] = i % 256
                msg.arrays["image"] = frame
            yield msg


class Consumer(Engine):
    """Records the arrival time of every message and checks each frame's stamp."""

    outputs = ()
    out = Param(str)

    def setup(self) -> None:
        self.times: list[float] = []
        self.bad = 0

    def process(self, msg: Message) -> None:
        self.times.append(time.perf_counter())
        image = msg.arrays.get("image")
        if image is not None and int(image[0, 0, 0]) != msg.seq % 256:
            self.bad += 1

    def teardown(self) -> None:
        Path(self.out).write_text(json.dumps({"times": self.times, "bad": self.bad}))


def steady_interval(times: list[float]) -> float:
    """Seconds per frame after the first quarter (start-up: pools fill, mappings are made): the median over
    ten consecutive chunks of the mean interval, so one stall of this shared VM does not decide the figure."""
    steady = times[max(1, len(times) // 4):]
    size = max(2, len(steady) // 10)
    chunks = [(c[-1] - c[0]) / (len(c) - 1) for c in (steady[i:i + size] for i in range(0, len(steady), size - 1))
              if len(c) > 1]
    return statistics.median(chunks)


def run_graphflow(shape: tuple[int, ...] | None, count: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        doc = {"engines": {
            "src": {"type": "channel:Producer", "placement": "process",
                    "params": {"count": count, "shape": list(shape or [])}},
            "dst": {"type": "channel:Consumer", "placement": "process", "params": {"out": str(out)}}},
            "connections": [["src.out", "dst.in"]]}
        summary = runtime.run(graph.build(doc, "bench-channel"), handle_signals=False)
        if summary.failed:
            raise SystemExit(f"graphflow run failed: {summary.errors}")
        got = json.loads(out.read_text())
    if got["bad"] or len(got["times"]) != count:
        raise SystemExit(f"graphflow delivered {len(got['times'])}/{count} frames, {got['bad']} with a wrong stamp")
    return steady_interval(got["times"])


def _zmq_consumer(endpoint: str, count: int, result: mp.Queue) -> None:
    sock = zmq.Context().socket(zmq.PULL)
    sock.bind(endpoint)
    times = []
    for _ in range(count):
        sock.recv_multipart(copy=False)
        times.append(time.perf_counter())
    result.put(times)


def run_zmq(shape: tuple[int, ...], count: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/bench"
        result = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=_zmq_consumer, args=(endpoint, count, result))
        proc.start()
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 8)
        sock.connect(endpoint)
        frame = np.ones(shape, np.uint8)
        for i in range(count):
            sock.send_multipart([i.to_bytes(8, "little"), frame], copy=False)
        times = result.get(timeout=120)
        proc.join()
        sock.close()
    return steady_interval(times)


def _queue_consumer(q: mp.Queue, count: int, result: mp.Queue) -> None:
    times = []
    for _ in range(count):
        q.get()
        times.append(time.perf_counter())
    result.put(times)


def run_queue(shape: tuple[int, ...], count: int) -> float:
    ctx = mp.get_context("spawn")
    q, result = ctx.Queue(maxsize=8), ctx.Queue()
    proc = ctx.Process(target=_queue_consumer, args=(q, count, result))
    proc.start()
    frame = np.ones(shape, np.uint8)
    for i in range(count):
        q.put((i, frame))
    times = result.get(timeout=300)
    proc.join()
    return steady_interval(times)


def run_copy(shape: tuple[int, ...], count: int) -> float:
    src, dst = np.ones(shape, np.uint8), np.empty(shape, np.uint8)
    np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(count):
        np.copyto(dst, src)
    return (time.perf_counter() - t0) / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames (under 30 s)")
    args = ap.parse_args()
    n = 200 if args.quick else 1000
    small = run_graphflow(None, n)
    rows = {}
    for name, shape in SIZES.items():
        mb = np.prod(shape) / 1e6
        slow_n = max(12, min(n, int(n / mb / 8)))  # pickling through a pipe is ~100× slower: fewer frames
        rows[name] = {"graphflow": run_graphflow(shape, n), "zmq": run_zmq(shape, n),
                      "mp_queue": run_queue(shape, slow_n), "copy": run_copy(shape, n)}
    print(f"{'frame':<10} {'transport':<10} {'µs/hop':>10} {'frames/s':>10} {'vs zmq':>8}")
    result = {"small_200B_us": round(small * 1e6, 1), "sizes": {}}
    for name, r in rows.items():
        result["sizes"][name] = {}
        for kind, sec in r.items():
            print(f"{name:<10} {kind:<10} {sec * 1e6:>10.1f} {1 / sec:>10.0f} {r['zmq'] / sec:>7.1f}x")
            result["sizes"][name][kind] = {"us_per_hop": round(sec * 1e6, 1), "fps": round(1 / sec, 1)}
        result["sizes"][name]["graphflow_vs_zmq"] = round(r["zmq"] / r["graphflow"], 1)
        result["sizes"][name]["graphflow_vs_200B"] = round(r["graphflow"] / small, 2)
    print(f"{'200 B':<10} {'graphflow':<10} {small * 1e6:>10.1f} {1 / small:>10.0f}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.modules.setdefault("channel", sys.modules["__main__"])
    main()
