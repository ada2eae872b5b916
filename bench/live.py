"""Live freshness of a service: the README's serve graph (graphs/demo.json) through a real `graphflow serve`, with
streams at their own pace (25 fps files, `realtime`, looped), once as the service runs it (connections out of
decode `drop_oldest` unless the graph says otherwise) and once with every connection `block`, interleaved.

Usage: python bench/live.py [--streams 2] [--seconds 30] [--repeats 1]

Every 5 s it reads GET /streams: per mode the median over streams of p50 latency (capture → end of graph, over
each stream's last 1000 frames), drops and states. Prints a table, then `RESULT {json}` with the last sample of
each mode and the ratio of p50 latencies (block / live)."""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def run_mode(mode: str, streams: int, seconds: float) -> list[dict[str, Any]]:
    """One service run; returns the samples taken every 5 s."""
    folder = Path(tempfile.mkdtemp(prefix=f"live-{mode}-"))
    doc = json.loads((ROOT / "graphs" / "demo.json").read_text())
    if mode == "block":
        doc["connections"] = [{"from": a, "to": b, "policy": "block"} for a, b in doc["connections"]]
    (folder / "graph.json").write_text(json.dumps(doc))
    shutil.copy(ROOT / "graphs" / "data" / "demo.mp4", folder / "clip.mp4")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "graphflow", "serve", str(folder / "graph.json"), "--port",
                             str(port), "--state", str(folder / "state.db")], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=open(folder / "log.txt", "w"))
    samples = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/readyz", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"{mode}: the service did not start: {(folder / 'log.txt').read_text()}")
                time.sleep(0.3)
        for i in range(streams):
            req = urllib.request.Request(base + "/streams", json.dumps(
                {"id": f"cam{i}", "uri": str(folder / "clip.mp4"), "loop": True, "realtime": True}).encode(),
                method="POST", headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=10)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(5)
            rows = get(base + "/streams")
            p50s = [r["latency_ms"]["p50"] for r in rows if r["latency_ms"]["p50"] is not None]
            samples.append({"mode": mode, "t": round(time.monotonic() - t0),
                            "p50_ms": round(statistics.median(p50s)) if p50s else None, "fps": round(sum(r["fps"] for r in rows), 1), "drops": sum(r["drops"] for r in rows),
                            "states": sorted({r["state"] for r in rows})})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(folder, ignore_errors=True)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    last: dict[str, list[dict[str, Any]]] = {"live": [], "block": []}
    print(f"{'mode':<6} {'t s':>4} {'p50 ms':>9} {'fps':>6} {'drops':>6}  states", flush=True)
    for _ in range(args.repeats):
        for mode in ("live", "block"):  # interleaved
            samples = run_mode(mode, args.streams, args.seconds)
            for s in samples:
                print(f"{s['mode']:<6} {s['t']:>4} {s['p50_ms'] if s['p50_ms'] is not None else '-':>9} "
                      f"{s['fps']:>6} {s['drops']:>6}  {','.join(s['states'])}", flush=True)
            if samples:
                last[mode].append(samples[-1])
    p50 = {m: statistics.median(s["p50_ms"] for s in v if s["p50_ms"] is not None) if v else None
           for m, v in last.items()}
    ratio = round(p50["block"] / p50["live"], 2) if p50["live"] and p50["block"] else None
    print("RESULT " + json.dumps({"streams": args.streams, "seconds": args.seconds, "p50_ms": p50,
                                  "block_over_live": ratio, "last": last}))


if __name__ == "__main__":
    main()
