"""RTSP ingest against a real RTSP server on loopback: GStreamer's gst-rtsp-server (Debian packages
gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-good, python3-gi) run by the system Python, serving the
demo clip's own H.264 packets, so decoded frames must equal the file's. Covers frames, a server killed
mid-stream and restarted (back-off, resume, counters, a file stream beside it unaffected), and URLs that
never connect."""
from __future__ import annotations

import itertools
import logging
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from graphflow.engines.decode import Decode
from graphflow import Message
from graphflow.testing import run_source
from graphflow.media.sources import open_source

DEMO = Path(__file__).resolve().parent.parent / "graphs" / "data" / "demo.mp4"
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-gi is installed for Debian's Python, not the project's
SERVER = '''
import sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer

Gst.init(None)
port, path = sys.argv[1], sys.argv[2]
server = GstRtspServer.RTSPServer(address="127.0.0.1", service=port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f'( filesrc location="{path}" ! qtdemux ! rtph264pay name=pay0 pt=96 )')
server.get_mount_points().add_factory("/cam", factory)
if not server.attach(None):
    sys.exit(f"cannot listen on 127.0.0.1:{port}")
print("ready", flush=True)
GLib.MainLoop().run()
'''
PROBE = ('import gi; gi.require_version("Gst", "1.0"); gi.require_version("GstRtspServer", "1.0"); '
         'from gi.repository import Gst, GstRtspServer; Gst.init(None); '
         'assert all(Gst.ElementFactory.find(e) for e in ("filesrc", "qtdemux", "rtph264pay"))')


def _server_available() -> bool:
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", PROBE], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _server_available(), reason="gst-rtsp-server for the system Python is missing "
                                "(apt-get install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good python3-gi)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtspServer:
    """gst-rtsp-server in a subprocess, serving `media` at rtsp://127.0.0.1:PORT/cam; each client session
    plays the file from its start in real time. Can be killed and started again on the same port."""

    def __init__(self, media: Path) -> None:
        self.media = media
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self) -> None:
        self.proc = subprocess.Popen([SYSTEM_PYTHON, "-c", SERVER, str(self.port), str(self.media)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.kill()
            raise RuntimeError(f"RTSP server did not start: {line!r}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.communicate()
            self.proc = None


@pytest.fixture
def rtsp():
    server = RtspServer(DEMO)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def demo_frames():
    """The first 60 frames of the demo clip decoded from the file: what the RTSP stream must give back."""
    return [f.image for f in itertools.islice(open_source({"uri": str(DEMO)}), 60)]


def test_rtsp_frames_equal_the_served_file(rtsp, demo_frames):
    rtsp.start()
    out = run_source(Decode, {"sources": [{"id": "cam", "uri": rtsp.url}]}, limit=40)
    assert [m.seq for m in out] == list(range(40))
    assert all(m.stream == "cam" and m.data == {"width": 640, "height": 360, "color": "bgr"} for m in out)
    assert [np.array_equal(m.image, ref) for m, ref in zip(out, demo_frames)] == [True] * 40
    assert np.allclose([m.pts for m in out], np.arange(40) / 25, atol=1e-3)


def test_a_live_stream_opens_without_reading_ahead(rtsp):
    """Opening does not probe the frame rate over ~20 frames: the first frames are the live edge and come at the
    camera's pace (10 frames at 25 fps span 0.36 s), not read ahead and handed over at once (a few ms)."""
    rtsp.start()
    source = open_source({"uri": rtsp.url})
    try:
        frames = list(itertools.islice(source, 10))
    finally:
        source.close()
    assert [f.index for f in frames] == list(range(10)) and source.rate == 25
    assert frames[-1].capture - frames[0].capture > 0.25


def test_server_killed_mid_stream_reconnects_while_file_stream_goes_on(rtsp, demo_frames, caplog):
    rtsp.start()
    engine = Decode("dec", {"sources": [{"id": "cam", "uri": rtsp.url}, {"id": "file", "uri": str(DEMO), "loop": True}],
                            "retry": 0.1, "retry_max": 0.4, "attempts": 0})
    engine.check()
    cam: dict[str, list] = {"before": [], "down": [], "back": []}
    file_seq: dict[str, list[int]] = {"before": [], "down": [], "back": []}
    phase, killed_at, restarted_at = "before", 0.0, 0.0
    states: dict[str, set[str]] = {"before": set(), "down": set(), "back": set()}
    deadline = time.monotonic() + 60
    caplog.set_level(logging.INFO)
    gen = engine.generate()
    try:
        for msg in gen:
            assert time.monotonic() < deadline, f"stuck in phase {phase}: {engine.metrics()['sources']['cam']}"
            if isinstance(msg, Message) and msg.stream == "cam":
                cam[phase].append(msg)
            elif isinstance(msg, Message):
                file_seq[phase].append(msg.seq)
                time.sleep(0.004)  # a consumer of ~250 frames/s, so the looping file does not hog both cores
            state = engine.metrics()["sources"]["cam"]
            states[phase].add(state["state"])
            if phase == "before" and len(cam["before"]) >= 25:
                rtsp.kill()
                phase, killed_at = "down", time.monotonic()
            elif phase == "down" and state["failed_attempts"] >= 2:
                rtsp.start()
                phase, restarted_at = "back", time.monotonic()
            elif phase == "back" and len(cam["back"]) >= 25:
                break
    finally:
        gen.close()
    frames = cam["before"] + cam["down"] + cam["back"]
    assert [m.seq for m in frames] == list(range(len(frames))), "seq carries on across the reconnect"
    assert "running" in states["before"] and "reconnecting" in states["down"] and "running" in states["back"], states
    assert states["down"] <= {"running", "reconnecting"}, states
    pts = np.array([m.pts for m in frames])
    assert np.all(np.diff(pts) > 0), "pts keep increasing across the reconnect"
    gap = pts[len(cam["before"]) + len(cam["down"])] - pts[len(cam["before"]) + len(cam["down"]) - 1]
    assert gap >= restarted_at - killed_at - 0.2, (gap, restarted_at - killed_at)
    assert all(np.array_equal(m.image, ref) for m, ref in zip(cam["before"], demo_frames))
    assert all(np.array_equal(m.image, ref) for m, ref in zip(cam["back"], demo_frames)), "replay from the start"
    seqs = file_seq["before"] + file_seq["down"] + file_seq["back"]
    assert seqs == list(range(len(seqs))) and len(file_seq["down"]) > 10, "the file stream went on during the outage"
    m = engine.metrics()
    assert {k: m["sources"]["cam"][k] for k in ("disconnects", "reconnects", "corrupt")} == \
        {"disconnects": 1, "reconnects": 1, "corrupt": 0}
    assert m["sources"]["cam"]["failed_attempts"] >= 2
    assert m["sources"]["file"]["disconnects"] == m["sources"]["file"]["failed_attempts"] == 0
    assert m["reconnects"] == 1 and m["decoded"] >= len(frames) + len(seqs)
    logs = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("cam: stream lost (end of stream) after") for line in logs), logs
    retries = [line for line in logs if f"cam: source {rtsp.url}: cannot open (Connection refused); retry" in line]
    hits = (re.search(r"(?:reconnecting|retry \d+) in ([0-9.]+) s$", line) for line in logs)
    delays = [float(hit.group(1)) for hit in hits if hit]
    assert len(retries) == m["sources"]["cam"]["failed_attempts"] >= 2, logs
    assert delays == [0.1, 0.2, 0.4, 0.4, 0.4, 0.4][:len(delays)], "capped exponential back-off"
    assert any(line.startswith("cam: stream resumed after") for line in logs), logs


def test_frozen_server_is_dropped_at_read_timeout_and_rejoined(rtsp, caplog):
    rtsp.start()
    engine = Decode("dec", {"sources": [{"id": "cam", "uri": rtsp.url, "read_timeout": 0.5, "open_timeout": 0.5}],
                            "retry": 0.1, "retry_max": 0.2, "attempts": 0})
    engine.check()
    seqs, phase, deadline = [], "live", time.monotonic() + 30
    gen = engine.generate()
    try:
        for msg in gen:
            assert time.monotonic() < deadline, (phase, engine.metrics()["sources"]["cam"])
            seqs += [msg.seq] if isinstance(msg, Message) else []
            state = engine.metrics()["sources"]["cam"]
            if phase == "live" and len(seqs) == 10:
                rtsp.proc.send_signal(signal.SIGSTOP)  # alive, connections open, but silent
                phase = "frozen"
            elif phase == "frozen" and state["failed_attempts"] >= 1:
                rtsp.proc.send_signal(signal.SIGCONT)
                phase = "thawed"
            elif phase == "thawed" and state["reconnects"] == 1 and len(seqs) >= 30:
                break
    finally:
        gen.close()
        rtsp.proc.send_signal(signal.SIGCONT)
    assert seqs == list(range(len(seqs)))
    assert engine.metrics()["sources"]["cam"]["disconnects"] == 1
    assert any(r.getMessage().startswith("cam: stream lost (no data for 0.5 s)") for r in caplog.records)


def test_restarted_engine_carries_the_live_stream_seq_on(rtsp, demo_frames):
    rtsp.start()
    engine = Decode("dec", {"sources": [{"id": "cam", "uri": rtsp.url}]})
    engine.resume = {"cam": 99}
    out = run_source(engine, limit=10)
    assert [m.seq for m in out] == list(range(100, 110)), "a live stream skips nothing; its seq follows on"
    assert all(np.array_equal(m.image, ref) for m, ref in zip(out, demo_frames))


@pytest.mark.parametrize("where", ["refused", "no such path"])
def test_url_that_never_connects_fails_in_one_line_after_the_attempts(rtsp, where, caplog):
    if where == "refused":
        url, cause = f"rtsp://127.0.0.1:{free_port()}/cam", "Connection refused"
    else:
        rtsp.start()
        url, cause = rtsp.url.replace("/cam", "/nothing"), "404"
    engine = Decode("dec", {"sources": [{"id": "cam", "uri": url}, {"id": "file", "uri": str(DEMO), "max_frames": 50}],
                            "retry": 0.05, "retry_max": 0.1, "attempts": 3})
    engine.check()
    got = []
    t0 = time.monotonic()
    got.extend(m for m in engine.generate() if isinstance(m, Message))
    message = engine.metrics()["sources"]["cam"]["error"]
    assert "\n" not in message and url in message and cause in message, message
    assert message.endswith("gave up after 3 failed attempts"), message
    assert time.monotonic() - t0 < 10
    assert [m.seq for m in got if m.stream == "file"] == list(range(50)), "the other source is not cut short"
    cam = engine.metrics()["sources"]["cam"]
    assert (cam["failed_attempts"], cam["state"], cam["error"]) == (3, "failed", message)
    assert message.startswith("stream 'cam': "), "the error names the stream"
    assert sum("retry" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 2
