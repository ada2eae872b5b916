"""bench/e2e.py's drop count: frames missing against those due in the measuring window, at its head, inside and
tail, beside the sequence-gap count (which misses the head and the tail)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FPS = 10.0


def record(stream: str, seq: int) -> dict:
    capture = 95.0 + seq / FPS  # a camera's frame k is due (and stamped) k frames after its first
    return {"stream": stream, "seq": seq, "times": {"capture": capture, "rule0": capture + 0.05}}


def test_drops_are_counted_against_the_frames_due_in_the_window(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    e2e = importlib.import_module("e2e")
    # window [100, 110] s (t1 111 s, its last second left out): frames 50…150 of a camera started at 95 s are due
    lost_a = {50, 51, 52, 80, 81, 148, 149, 150}  # 3 at the head, 2 inside, 3 at the tail
    recs = [record("a", k) for k in range(0, 160) if k not in lost_a and k < 148]
    recs += [record("b", k) for k in range(0, 11)]  # b stopped before the window: all its 100 frames due are lost
    recs += [record("c", k) for k in range(0, 200)]  # c lost nothing
    out = tmp_path / "shard0.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"stream": "a", "se')  # a line being written
    row = e2e.Row(streams=3, shards=1)
    e2e._measure(row, [out], 100.0, 111.0, FPS)
    assert row.missing == {"head": 3 + 100, "inside": 2, "tail": 3}
    assert row.due == 101 + 100 + 101 and row.frames == 93 + 101
    assert row.dropped_due_pct == round(100 * 108 / 302, 3)
    assert not row.ok and row.errors == ["1 streams delivered nothing in the window"]
    row = e2e.Row(streams=2, shards=1)  # without b: the gaps see 2 of a's 8 missing frames, the due count all 8
    out.write_text("".join(json.dumps(r) + "\n" for r in recs if r["stream"] != "b"))
    e2e._measure(row, [out], 100.0, 111.0, FPS)
    assert row.dropped_pct == round(100 * 2 / (95 + 101), 3)
    assert row.dropped_due_pct == round(100 * 8 / 202, 3) and row.missing == {"head": 3, "inside": 2, "tail": 3}
    assert row.p95_ms == 50.0 and not row.ok  # 4 % dropped of the frames due
