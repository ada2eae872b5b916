"""Evidence of events in a real `graphflow serve`: a line crossing in the demo video gets its annotated snapshot,
the crossing object's crop and a clip from `pre` s before to `post` s after (remuxed from the stream's own packets),
served over HTTP with range requests; the folder's retention holds its size bound."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("uvicorn")

from test_service import DEMO, GRAPH, Server, wait_for  # noqa: E402

import json  # noqa: E402
import shutil  # noqa: E402
import urllib.request  # noqa: E402


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "graph.json").write_text(json.dumps(GRAPH))
    shutil.copy(DEMO, tmp_path / "clip.mp4")
    return tmp_path


def fetch(server: Server, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(server.url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_an_event_has_its_snapshot_crop_and_clip_served(site: Path):
    server = Server(site, "--evidence-pre", "2", "--evidence-post", "2")
    try:
        spec = {"id": "cam1", "uri": str(site / "clip.mp4"), "fps": 10, "loop": True, "realtime": True}
        assert server.call("POST", "/streams", spec)[0] == 201
        events = wait_for(lambda: server.call("GET", "/events?stream=cam1&kind=cross")[1], timeout=90,
                          what="a crossing")
        ev = events[-1]
        eid, body = ev["event"]["id"], ev["event"]
        assert body["evidence"] == {"snapshot": f"/events/{eid}/snapshot.jpg", "crop": f"/events/{eid}/crop.jpg",
                                    "clip": f"/events/{eid}/clip.mp4"}
        assert server.call("GET", f"/events/{eid}")[1]["event"]["id"] == eid

        status, jpeg, headers = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(
            fetch(server, f"/events/{eid}/snapshot.jpg")), timeout=30, what="the snapshot")
        assert headers["content-type"] == "image/jpeg"
        snapshot = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        with av.open(str(DEMO)) as c:
            width, height = c.streams.video[0].width, c.streams.video[0].height
        assert snapshot.shape == (height, width, 3)
        status, crop_jpeg, _ = fetch(server, f"/events/{eid}/crop.jpg")
        crop = np.asarray(Image.open(io.BytesIO(crop_jpeg)).convert("RGB"))
        assert status == 200 and 8 < crop.shape[0] < height and 4 < crop.shape[1] < width

        status, clip, headers = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(
            fetch(server, f"/events/{eid}/clip.mp4")), timeout=30, what="the clip")
        assert headers["content-type"] == "video/mp4"
        path = site / "got.mp4"
        path.write_bytes(clip)
        with av.open(str(path)) as c:
            times = [float(f.time) for f in c.decode(video=0)]
            size = (c.streams.video[0].width, c.streams.video[0].height)
        assert size == (width, height) and times[-1] - times[0] >= 2 + 2 - 0.2, times[:3] + times[-3:]
        status, part, headers = fetch(server, f"/events/{eid}/clip.mp4", {"Range": "bytes=0-99"})
        assert status == 206 and part == clip[:100] and headers["content-range"].startswith("bytes 0-99/")

        assert fetch(server, "/events/nope/clip.mp4")[0] == 404
        assert fetch(server, f"/events/{eid}/other.bin")[0] == 404
        folder = site / "evidence"
        assert (folder / f"{eid}.jpg").is_file() and (folder / f"{eid}.mp4").is_file()
    finally:
        server.stop()


def test_events_of_a_rule_that_is_no_alarm_get_no_evidence(tmp_path: Path):
    """A rule with "alarm": false marks its events so; the service keeps their record but makes no evidence."""
    from graphflow import Message
    from graphflow.serve.controller import Service
    from graphflow.serve.evidence import EvidencePolicy
    from graphflow.serve.store import Store
    from graphflow.serve.streams import StreamMeter
    from graphflow.vision.rules import parse_rules

    quiet, loud = parse_rules([{"id": "q", "kind": "line_cross", "line": [[0.5, 0], [0.5, 1]], "alarm": False},
                               {"id": "l", "kind": "line_cross", "line": [[0.5, 0], [0.5, 1]]}])
    assert quiet.alarm is False and loud.alarm is True
    store = Store(tmp_path / "state.db")
    svc = Service(store, [tmp_path], evidence=(tmp_path / "evidence", EvidencePolicy()))
    try:
        svc.meters["cam"] = StreamMeter()
        events = [{"rule": "q", "event": "cross", "alarm": False}, {"rule": "l", "event": "cross"}]
        svc.observe(Message("cam", 1, None, {"events": events}, {"image": np.zeros((8, 8, 3), np.uint8)}), "t")
        rows = {e["event"]["rule"]: e["event"] for e in svc.events("cam", None, None, 10)}
        assert "id" not in rows["q"] and "evidence" not in rows["q"]
        assert rows["l"]["evidence"]["snapshot"] == f"/events/{rows['l']['id']}/snapshot.jpg"
        wait_for(lambda: (tmp_path / "evidence" / f"{rows['l']['id']}.jpg").is_file(), timeout=10, what="the snapshot")
        assert [p.name for p in (tmp_path / "evidence").iterdir()] == [f"{rows['l']['id']}.jpg"]
    finally:
        svc.stop()
        store.close()


def test_retention_deletes_the_oldest_evidence_past_the_size_bound(tmp_path: Path):
    from graphflow.serve.evidence import Evidence, EvidencePolicy

    evidence = Evidence(tmp_path, EvidencePolicy(keep_mb=0.1, keep_days=1.0), lambda *a: None)
    try:
        for i in range(30):
            p = tmp_path / f"e{i:02d}.mp4"
            p.write_bytes(os.urandom(10_000))
            os.utime(p, (time.time() - 300 + i, time.time() - 300 + i))
        old = tmp_path / "old.jpg"
        old.write_bytes(b"x")
        os.utime(old, (time.time() - 3 * 86400,) * 2)
        evidence.prune()
        left = sorted(p.name for p in tmp_path.iterdir())
        assert "old.jpg" not in left and sum((tmp_path / n).stat().st_size for n in left) <= 0.1 * 2**20
        assert left == [f"e{i:02d}.mp4" for i in range(30 - len(left), 30)]  # the newest stay
        assert evidence.metrics()["pruned"] == 31 - len(left)
    finally:
        evidence.close()
