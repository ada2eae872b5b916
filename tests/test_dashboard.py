"""The dashboard of `graphflow serve`: live previews (graphflow.serve.previews), their HTTP routes, and the page itself
driven in a real headless Chromium (skipped when Debian's chromium or Playwright is absent).

The HTTP side runs in a real uvicorn over `graphflow.serve.api.create_app` with `Feeds`, a small Controller that decodes
graphs/data/demo.mp4 with PyAV and evaluates real rules (graphflow.vision.rules) on one synthetic track walking
left to right across the frame, so line crossings happen at a known place and direction."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from graphflow.serve.api import create_app
from graphflow.errors import GraphflowError
from graphflow.graph.loader import load
from graphflow.serve.live import LiveFeed
from graphflow.message import Message
from graphflow.serve.previews import Previews, graph_png
from graphflow.serve.streams import StreamMeter
from graphflow.vision.rules import RuleSet, parse_rules

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT / "graphs" / "data" / "demo.mp4"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WALK = 30  # frames the synthetic track takes to cross the frame; a new track id per walk


def first_frame() -> np.ndarray:
    with av.open(str(VIDEO)) as container:
        return next(container.decode(video=0)).to_ndarray(format="bgr24")


def walker(seq: int, width: int, height: int) -> dict[str, Any]:
    """The synthetic person of frame `seq`: walks left to right, from 10% to 90% of the width, every WALK frames."""
    x = width * (0.1 + 0.8 * (seq % WALK) / (WALK - 1))
    return {"box": [x - 20, height * 0.3, x + 20, height * 0.85], "track_id": seq // WALK + 1, "class_id": 0,
            "label": "person", "score": 0.9}


class Feed:
    """One stream: decodes its video in a loop at `fps`, runs the rules on the walker, hands frames to previews."""

    def __init__(self, owner: Feeds, spec: dict[str, Any]) -> None:
        self.owner, self.spec, self.id = owner, spec, spec["id"]
        self.fps = float(spec.get("fps") or 10)
        self.rules: list[dict[str, Any]] = []
        self.ruleset = RuleSet([])
        self.meter = StreamMeter()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"feed-{self.id}", daemon=True)
        self.thread.start()

    def set_rules(self, rules: list[dict[str, Any]]) -> None:
        self.rules, self.ruleset = rules, RuleSet(rules)

    def run(self) -> None:
        seq = 0
        while not self.stopping.is_set():
            with av.open(self.spec["uri"]) as container:
                for frame in container.decode(video=0):
                    if self.stopping.wait(1 / self.fps):
                        return
                    seq += 1
                    image = frame.to_ndarray(format="bgr24")
                    h, w = image.shape[:2]
                    tracks = [walker(seq, w, h)]
                    ruleset = self.ruleset
                    events = ruleset.evaluate(self.id, seq, seq / self.fps, tracks, w, h)
                    data = {"width": w, "height": h, "color": "bgr", "tracks": tracks, "events": events}
                    if self.rules:
                        data["rules"] = ruleset.overlay(self.id)
                    msg = Message(stream=self.id, seq=seq, data=data, arrays={"image": image},
                                  times={"capture": time.time()})
                    self.owner.previews.offer(msg)
                    self.meter.add(time.monotonic(), time.time() - msg.times["capture"])
                    self.owner.publish(self.id, seq, events)


class Feeds:
    """A graphflow.serve.api.Controller over Feed threads, with the events kept in memory."""

    def __init__(self, graph_file: str = "graphs/demo.json") -> None:
        self.previews = Previews(max_fps=8, max_width=480)
        self.feeds: dict[str, Feed] = {}
        self.log: list[dict[str, Any]] = []
        self.feed = LiveFeed()
        self.lock = threading.Lock()
        self.put_rules: list[list[dict[str, Any]]] = []
        self._graph = load(ROOT / graph_file)

    def close(self) -> None:
        for stream in list(self.feeds):
            self.remove_stream(stream)
        self.previews.close()

    def publish(self, stream: str, seq: int, events: list[dict[str, Any]]) -> None:
        with self.lock:
            for ev in events:
                self.log.append({"n": len(self.log) + 1, "ts": time.time(), "stream": stream, "kind": ev["event"],
                                 "event": ev})
        self.feed.publish([{"stream": stream, "kind": ev["event"], "seq": seq, "event": ev} for ev in events])

    def add_stream(self, spec: dict[str, Any]) -> dict[str, Any]:
        stream = spec.get("id")
        if not isinstance(stream, str) or not stream:
            raise GraphflowError("streams: 'id' must be a non-empty string")
        if stream in self.feeds:
            raise FileExistsError(f"stream {stream!r} exists (DELETE it first)")
        if not Path(str(spec.get("uri"))).is_file():
            raise GraphflowError(f"streams.uri: no such file {spec.get('uri')!r}")
        self.feeds[stream] = Feed(self, dict(spec))
        return self.stream(stream)

    def remove_stream(self, stream: str) -> None:
        feed = self.feeds.pop(stream)
        feed.stopping.set()
        feed.thread.join(10)
        self.previews.forget(stream)

    def stream(self, stream: str) -> dict[str, Any]:
        feed = self.feeds[stream]
        return {"id": stream, "uri": feed.spec["uri"], "state": "running", "frames": feed.meter.frames,
                "fps": round(feed.meter.fps(time.monotonic()), 2), "drops": 0, "events": feed.meter.events,
                "latency_ms": feed.meter.percentiles(), "error": ""}

    def streams(self) -> list[dict[str, Any]]:
        return [self.stream(s) for s in list(self.feeds)]

    def rules(self, stream: str) -> list[dict[str, Any]]:
        return self.feeds[stream].rules

    def set_rules(self, stream: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        feed = self.feeds[stream]
        parse_rules(rules)
        feed.set_rules(rules)
        self.put_rules.append(rules)
        return rules

    def graph(self) -> dict[str, Any]:
        engines = {eid: {"type": n.type, "placement": n.placement,
                         "stats": {"state": "running", "received": 10, "sent": 10, "dropped": 0, "errors": 0,
                                   "busy_s": 0.5, "depth": 0}} for eid, n in self._graph.nodes.items()}
        edges = [{"from": f"{e.src}.{e.src_port}", "to": f"{e.dst}.{e.dst_port}", "policy": e.policy}
                 for e in self._graph.edges]
        return {"name": self._graph.name, "engines": engines, "connections": edges}

    def graph_png(self) -> bytes:
        return graph_png(self._graph)

    def healthy(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def not_ready(self) -> str:
        return ""

    def events(self, stream: str | None, kind: str | None, since: float | None, limit: int) -> list[dict[str, Any]]:
        with self.lock:
            rows = [r for r in self.log if stream in (None, r["stream"]) and kind in (None, r["kind"])
                    and (since is None or r["ts"] >= since)]
        return rows[::-1][:limit]

    def metrics(self) -> tuple[bytes, str]:
        return b"", "text/plain"


class Server:
    """create_app(controller, token) served by a real uvicorn on a free loopback port, in a thread."""

    def __init__(self, controller: Any, token: str | None = None, **options: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(controller, token, **options), log_level="warning",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def get(url: str, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def until(check: Any, what: str, timeout: float = 30.0) -> Any:
    """Poll `check()` until truthy (a hang guard, not a speed claim)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def feeds():
    controller = Feeds()
    yield controller
    controller.close()


@pytest.fixture
def server(feeds):
    srv = Server(feeds)
    yield srv
    srv.close()


# previews without HTTP ---------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def frame_msg(seq: int, image: np.ndarray, events: list | None = None, rules: list | None = None) -> Message:
    h, w = image.shape[:2]
    data = {"width": w, "height": h, "color": "bgr", "tracks": [walker(seq, w, h)], "events": events or []}
    if rules is not None:
        data["rules"] = rules
    return Message(stream="cam", seq=seq, data=data, arrays={"image": image})


def test_previews_encode_only_watched_streams_at_the_capped_rate_and_width():
    clock = Clock()
    previews = Previews(max_fps=2.0, max_width=320, clock=clock)
    image = first_frame()
    try:
        for seq in range(1, 6):
            previews.offer(frame_msg(seq, image))
        assert previews.encoded == 0 and previews.latest("cam") is None  # nobody watches: nothing encoded
        with previews.watch("cam"):
            assert previews.viewers("cam") == 1
            for seq in range(6, 16):  # ten frames within one clock instant: one preview
                previews.offer(frame_msg(seq, image))
            first = previews.wait("cam", 0, timeout=30)
            assert first is not None and first.frame == 6
            clock.now += 0.5  # 1 / max_fps later: the next frame is encoded
            previews.offer(frame_msg(16, image))
            second = previews.wait("cam", first.n, timeout=30)
            assert second is not None and second.frame == 16
        assert previews.viewers("cam") == 0
        previews.offer(frame_msg(17, image))
        clock.now += 10
        previews.offer(frame_msg(18, image))
        assert previews.wait("cam", second.n, timeout=0.5) is None  # the viewer left: no more encoding
        assert previews.encoded == 2
        picture = Image.open(io.BytesIO(second.jpeg))
        assert picture.format == "JPEG" and picture.size == (320, 180) == (second.width, second.height)
        previews.hold("cam", 1.0)  # a snapshot poller counts as a viewer for a while
        assert previews.viewers("cam") == 1
        previews.offer(frame_msg(19, image))
        third = previews.wait("cam", second.n, timeout=30)
        assert third is not None and third.frame == 19
        clock.now += 1.0
        assert previews.viewers("cam") == 0
    finally:
        previews.close()


def test_previews_share_a_total_rate_and_copy_nothing_while_the_worker_is_behind():
    """Many watched streams: each stream's interval grows so that all together stay within total_fps, and no
    frame is copied while max_queued copies wait for the encoder, however many streams are watched."""
    clock = Clock()
    previews = Previews(max_fps=5.0, max_width=320, clock=clock, total_fps=10.0, max_queued=2)
    image = first_frame()
    try:
        assert previews.interval(clock()) == 0.2
        with contextlib.ExitStack() as stack:
            for i in range(40):
                stack.enter_context(previews.watch(f"cam{i}"))
            clock.now += 1.0
            assert previews.interval(clock()) == 4.0  # 40 streams share 10 previews a second
            with previews._cond:  # hold the worker: every copy made now waits
                for i in range(40):
                    msg = frame_msg(1, image)
                    msg.stream = f"cam{i}"
                    previews.offer(msg)
                queued = sum(1 for st in previews.streams.values() if st.job is not None)
            assert queued == 2 and previews.skipped == 38
    finally:
        previews.close()


def test_mjpeg_viewers_past_the_cap_get_a_one_line_503(feeds):
    srv = Server(feeds, max_viewers=2)
    open_ones = []
    try:
        feeds.add_stream({"id": "cam1", "uri": str(VIDEO), "fps": 10})
        for _ in range(2):
            open_ones.append(read_mjpeg_parts(f"{srv.url}/streams/cam1/preview.mjpg", 1)[1])
        status, _, body = get(f"{srv.url}/streams/cam1/preview.mjpg")
        assert status == 503 and "2 live previews open already" in json.loads(body)["error"]
        open_ones.pop().close()
        until(lambda: get(f"{srv.url}/streams/cam1/preview.json")[2] and feeds.previews.viewers("cam1") == 1,
              "a viewer to leave")
        _, again = read_mjpeg_parts(f"{srv.url}/streams/cam1/preview.mjpg", 1)  # room again
        open_ones.append(again)
    finally:
        for response in open_ones:
            response.close()
        srv.close()


def test_a_reader_waiting_before_the_frame_comes_gets_its_preview():
    previews = Previews(max_fps=5.0, max_width=320)
    got: list = []
    try:
        with previews.watch("cam"):
            reader = threading.Thread(target=lambda: got.append(previews.wait("cam", 0, timeout=30)))
            reader.start()
            time.sleep(0.2)  # the reader blocks in wait() first (as the HTTP side does), then the frame comes
            previews.offer(frame_msg(1, first_frame()))
            reader.join(60)
        assert got and got[0] is not None and got[0].frame == 1
    finally:
        previews.close()


def test_preview_is_annotated_with_boxes_and_rules_scaled_to_its_width():
    previews = Previews(max_fps=5.0, max_width=320)
    image = first_frame()
    h, w = image.shape[:2]
    line = {"id": "door", "kind": "line_cross", "line": [[w * 0.25, 0.0], [w * 0.25, h - 1.0]],
            "counts": {"A->B": 3, "B->A": 4}}
    try:
        with previews.watch("cam"):
            previews.offer(frame_msg(1, image, rules=[line]))
            preview = previews.wait("cam", 0, timeout=30)
        shown = np.asarray(Image.open(io.BytesIO(preview.jpeg)).convert("RGB")).astype(int)
        plain = np.asarray(Image.fromarray(image[..., ::-1]).resize((320, 180))).astype(int)
        column = shown[100:170, 80:82].reshape(-1, 3)  # the 2-pixel line, at a quarter of the preview's width
        assert (column[:, 0] > 170).mean() > 0.9 and (column[:, 1] > 170).mean() > 0.9  # yellow: red + green
        assert (column[:, 2] < 110).mean() > 0.9
        box = walker(1, w, h)["box"]
        left = round(box[0] * 320 / w)
        edge = np.abs(shown[70:140, left] - plain[70:140, left]).mean()  # the box's left edge is drawn
        assert edge > 40
        assert previews.info("cam")["rules"][0]["counts"] == {"A->B": 3, "B->A": 4}
    finally:
        previews.close()


def test_frames_with_events_keep_their_picture_and_flash_later():
    clock = Clock()
    previews = Previews(max_fps=1.0, max_width=320, clock=clock)
    image = first_frame()
    event = {"rule": "door", "event": "cross", "track_id": 1, "frame": 2}
    try:
        with previews.watch("cam"):
            previews.offer(frame_msg(1, image))
            first = previews.wait("cam", 0, timeout=30)
            clock.now += 0.6  # past half the interval: a frame with events is encoded sooner than the cap
            previews.offer(frame_msg(2, image, events=[event]))
            second = previews.wait("cam", first.n, timeout=30)
            previews.offer(frame_msg(3, image, events=[{**event, "frame": 3}]))  # within the cap: not drawn
            clock.now += 1.0
            previews.offer(frame_msg(4, image))
            third = previews.wait("cam", second.n, timeout=30)
        assert second.frame == 2 and previews.picture("cam", 2) is second and previews.picture("cam", 1) is None
        assert third.frame == 4 and previews.picture("cam", 3) is third  # the event's flash, on the next frame
        assert previews.info("cam")["pictures"] == [2, 3]
        previews.forget("cam")
        assert previews.latest("cam") is None and previews.info("cam") == {"pictures": []}
    finally:
        previews.close()


# the HTTP routes -----------------------------------------------------------------------------------------------------
def read_mjpeg_parts(url: str, count: int) -> tuple[list[bytes], Any]:
    """The first `count` JPEGs of a multipart/x-mixed-replace response, and the response (still open)."""
    response = urllib.request.urlopen(url, timeout=30)
    assert response.headers.get_content_type() == "multipart/x-mixed-replace"
    boundary = response.headers.get_param("boundary").encode()
    parts = []
    while len(parts) < count:
        line = response.readline()
        if line.strip() != b"--" + boundary:
            continue
        headers = {}
        while (line := response.readline().strip()):
            key, _, value = line.decode().partition(":")
            headers[key.lower()] = value.strip()
        assert headers["content-type"] == "image/jpeg"
        parts.append(response.read(int(headers["content-length"])))
    return parts, response


def test_mjpeg_counts_a_viewer_while_connected_and_snapshots_answer(feeds, server):
    feeds.add_stream({"id": "cam1", "uri": str(VIDEO), "fps": 10})
    assert feeds.previews.viewers("cam1") == 0
    parts, response = read_mjpeg_parts(f"{server.url}/streams/cam1/preview.mjpg", 2)
    try:
        assert feeds.previews.viewers("cam1") == 1
        assert all(Image.open(io.BytesIO(p)).size == (480, 270) for p in parts)
        assert parts[0] != parts[1]
    finally:
        response.close()
    until(lambda: feeds.previews.viewers("cam1") == 0, "the MJPEG viewer to be counted out")
    status, headers, body = get(f"{server.url}/streams/cam1/preview.jpg")
    assert status == 200 and headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(body)).format == "JPEG"
    n = int(headers["x-preview"])
    status, headers, _ = get(f"{server.url}/streams/cam1/preview.jpg?after={n}")
    assert status == 200 and int(headers["x-preview"]) > n
    status, _, body = get(f"{server.url}/streams/nope/preview.mjpg")
    assert status == 404 and json.loads(body) == {"error": "no stream 'nope'"}
    status, _, body = get(f"{server.url}/streams/cam1/preview.jpg?after=x")
    assert status == 400 and "after must be an integer" in json.loads(body)["error"]
    status, _, body = get(f"{server.url}/streams/cam1/events/123456.jpg")
    assert status == 404 and "\n" not in json.loads(body)["error"]


def test_removing_a_stream_ends_its_mjpeg_and_frees_the_viewer(feeds, server):
    feeds.add_stream({"id": "cam1", "uri": str(VIDEO), "fps": 10})
    _, response = read_mjpeg_parts(f"{server.url}/streams/cam1/preview.mjpg", 1)
    try:
        feeds.remove_stream("cam1")
        until(lambda: response.read(65536) == b"", "the MJPEG response to end")
    finally:
        response.close()
    until(lambda: feeds.previews.viewers("cam1") == 0, "the viewer to be counted out")
    assert "cam1" not in feeds.previews.streams


def test_snapshot_of_a_stream_without_a_picture_yet_is_204(feeds, server):
    feeds.add_stream({"id": "slow", "uri": str(VIDEO), "fps": 0.05})  # its first frame comes after 20 s
    status, headers, body = get(f"{server.url}/streams/slow/preview.jpg")
    assert status == 204 and body == b"" and "x-preview" not in headers


def test_preview_routes_answer_one_line_404_without_previews():
    class NoPreviews:
        def stream(self, stream: str) -> dict[str, Any]:
            return {"id": stream}

    srv = Server(NoPreviews())
    try:
        for path in ("preview.mjpg", "preview.jpg", "preview.json", "events/3.jpg"):
            status, _, body = get(f"{srv.url}/streams/cam1/{path}")
            assert status == 404 and json.loads(body) == {"error": "live previews are off in this service"}
        status, _, body = get(f"{srv.url}/graph.png")
        assert status == 404 and json.loads(body) == {"error": "this service draws no graph picture"}
    finally:
        srv.close()


def test_page_assets_and_graph_picture_are_served(server):
    status, headers, body = get(f"{server.url}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    html = body.decode()
    for asset in ("/web/app.js", "/web/style.css"):
        assert asset in html
        status, _, data = get(server.url + asset)
        assert status == 200 and data
    assert "http://" not in html and "https://" not in html  # self-contained: nothing from another host
    status, headers, body = get(f"{server.url}/graph.png")
    assert status == 200 and Image.open(io.BytesIO(body)).format == "PNG"
    paths = json.loads(get(f"{server.url}/openapi.json")[2])["paths"]
    assert {"/streams/{id}/preview.mjpg", "/streams/{id}/preview.jpg", "/graph.png"} <= set(paths)


# the page in a real browser ---------------------------------------------------------------------------------------
def artifacts() -> Path:
    """Where screenshots go: $GRAPHFLOW_ARTIFACTS, else a folder under the system's temp dir."""
    path = Path(os.environ.get("GRAPHFLOW_ARTIFACTS") or Path(os.environ.get("TMPDIR", "/tmp")) / "graphflow-dashboard")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.console_errors = []
    pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda exc: pg.console_errors.append(str(exc)))
    yield pg
    context.close()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_page_adds_a_stream_that_plays_live_then_removes_it(feeds, server, page):
    page.goto(server.url + "/")
    page.wait_for_selector("#empty:not([hidden])")
    page.fill("#add-id", "cam1")
    page.fill("#add-uri", str(VIDEO))
    page.fill("#add-fps", "10")
    page.check("#add-loop")
    page.click("#add-submit")
    tile = page.wait_for_selector('.tile[data-stream="cam1"]')
    img = page.locator('.tile[data-stream="cam1"] img')
    page.wait_for_function("n => Number(document.querySelector(n).dataset.preview || 0) > 0",
                           arg='.tile[data-stream="cam1"] img')
    assert feeds.feeds["cam1"].spec == {"id": "cam1", "uri": str(VIDEO), "fps": 10, "loop": True}
    page.wait_for_function("() => document.querySelector('.tile .state').textContent === 'running'")
    first = img.screenshot()
    shown = int(img.get_attribute("data-preview"))
    page.wait_for_function("n => Number(document.querySelector('.tile img').dataset.preview) > n + 3", arg=shown)
    second = img.screenshot()
    assert np.abs(pixels(first) - pixels(second)).mean() > 1.0  # the live image changes over time
    page.screenshot(path=str(artifacts() / "dashboard_grid.png"))
    assert page.console_errors == []
    tile.query_selector("button.remove").click()
    page.wait_for_selector('.tile[data-stream="cam1"]', state="detached")
    assert "cam1" not in feeds.feeds
    page.wait_for_selector("#empty:not([hidden])")
    assert page.console_errors == []


def test_drawing_a_line_and_saving_it_makes_crossing_events_appear(feeds, server, page):
    feeds.add_stream({"id": "cam1", "uri": str(VIDEO), "fps": 10})
    page.goto(server.url + "/#/stream/cam1")
    page.wait_for_function("() => document.getElementById('s-live').naturalWidth > 0")
    page.select_option("#r-kind", "line_cross")
    page.fill("#r-id", "door")
    page.select_option("#r-direction", "B->A")
    page.click("#r-draw")
    box = page.locator("#s-canvas").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.05)  # top to bottom: A is right
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.95)
    page.wait_for_selector("#r-list li:has-text('door')")
    page.select_option("#r-kind", "zone")
    page.click("#r-draw")
    corners = [(0.6, 0.1), (0.95, 0.1), (0.95, 0.95), (0.6, 0.95)]  # the right part, where the walker ends
    for fx, fy in corners:
        page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
    page.click("#r-finish")
    page.wait_for_selector("#r-list li:has-text('zone2')")
    page.click("#r-save")
    page.wait_for_selector("#r-saved:has-text('saved')")
    (saved,) = feeds.put_rules
    assert saved[0]["id"] == "door" and saved[0]["kind"] == "line_cross" and saved[0]["direction"] == "B->A"
    (x1, y1), (x2, y2) = saved[0]["line"]
    assert abs(x1 - 0.5) < 0.01 and abs(x2 - 0.5) < 0.01 and y1 < 0.1 and y2 > 0.9
    assert saved[1]["id"] == "zone2" and saved[1]["kind"] == "zone"
    assert np.allclose(saved[1]["polygon"], corners, atol=0.01)  # normalised, as rules.py reads values ≤ 1
    page.wait_for_function("() => { const r = document.querySelector('#s-counters tr[data-rule=zone2]');"
                           " return r && r.children[1].textContent === 'inside'; }")
    event = page.wait_for_selector("#s-events li:has-text('cross')")  # live, through Server-Sent Events
    assert "door" in event.text_content() and "B->A" in event.text_content()
    page.wait_for_function("() => { const r = document.querySelector('#s-counters tr[data-rule=door]');"
                           " return r && Number(r.children[4].textContent) >= 1; }")
    page.wait_for_function("() => [...document.querySelectorAll('#s-events img')]"  # the crossing frame's picture
                           ".some(i => !i.hidden && i.complete && i.naturalWidth > 0)")
    assert all(e["event"]["direction"] == "B->A" for e in feeds.events("cam1", "cross", None, 100))
    page.screenshot(path=str(artifacts() / "dashboard_stream.png"))
    page.goto(server.url + "/#/graph")
    page.wait_for_selector("#g-engines tr[data-engine=det]")
    page.wait_for_function("() => document.getElementById('g-picture').naturalWidth > 0")
    page.screenshot(path=str(artifacts() / "dashboard_graph.png"))
    assert page.console_errors == []


def test_page_asks_for_the_token_once_and_sends_it(feeds, page):
    """With a token every read needs it too: the page asks at once, keeps it for the tab (sessionStorage) and sends
    it on its calls, its snapshots, its MJPEG view and its event stream (`?token=`, which cannot send headers)."""
    srv = Server(feeds, token="s3cret")
    try:
        page.goto(srv.url + "/")
        page.wait_for_selector("#token-dialog[open]")
        page.fill("#token-input", "s3cret")
        page.click("#token-ok")
        page.fill("#add-id", "cam2")
        page.fill("#add-uri", str(VIDEO))
        page.click("#add-submit")
        page.wait_for_selector('.tile[data-stream="cam2"]')
        page.wait_for_function("() => Number(document.querySelector('.tile img').dataset.preview || 0) > 0")
        page.click('.tile[data-stream="cam2"]')
        page.wait_for_function("() => document.getElementById('s-live').naturalWidth > 0")
        assert "token=s3cret" in page.eval_on_selector("#s-live", "img => img.src")
        assert page.evaluate("() => sessionStorage.getItem('graphflow.token')") == "s3cret"
        page.click("#s-remove")
        page.wait_for_selector('.tile[data-stream="cam2"]', state="detached")
        assert page.locator("#token-dialog[open]").count() == 0  # asked once: the rest used the kept token
        assert not feeds.feeds
        assert get(srv.url + "/streams")[0] == 401 and get(srv.url + "/streams?token=s3cret")[0] == 200
    finally:
        srv.close()


# the page over the real service -----------------------------------------------------------------------------------
@pytest.fixture
def service(tmp_path):
    from graphflow.serve.controller import Service
    from graphflow.serve.store import Store
    from graphflow.serve.task import build_task

    doc = json.loads((ROOT / "graphs" / "demo.json").read_text())
    del doc["engines"]["out"]  # no files: the service's tap ends the graph
    doc["connections"] = [c for c in doc["connections"] if "out.in" not in c]
    store = Store(tmp_path / "state.db")
    svc = Service(store, [VIDEO.parent])
    svc.start([build_task("demo", doc, str(tmp_path / "graph.json"))])
    srv = Server(svc)
    yield svc, srv
    srv.close()
    svc.stop()
    store.close()


def test_real_service_page_plays_counts_crossings_and_removes(service, page):
    """Through the real graph (YOLOX-Nano, ByteTrack, the rule engine): a camera added by the form plays live,
    a line drawn across the doorway counts the people crossing it, and removing the camera removes its tile."""
    svc, srv = service
    page.goto(srv.url + "/")
    page.fill("#add-id", "cam1")
    page.fill("#add-uri", str(VIDEO))
    page.fill("#add-fps", "10")
    page.check("#add-loop")
    page.check("#add-realtime")
    page.click("#add-submit")
    page.wait_for_selector('.tile[data-stream="cam1"]')
    img = page.locator('.tile[data-stream="cam1"] img')
    page.wait_for_function("() => Number(document.querySelector('.tile img').dataset.preview || 0) > 0",
                           timeout=60_000)
    first = img.screenshot()
    shown = int(img.get_attribute("data-preview"))
    page.wait_for_function("n => Number(document.querySelector('.tile img').dataset.preview) > n + 5", arg=shown)
    assert np.abs(pixels(first) - pixels(img.screenshot())).mean() > 1.0
    assert page.console_errors == []

    page.click('.tile[data-stream="cam1"]')
    page.wait_for_function("() => document.getElementById('s-live').naturalWidth > 0")
    page.wait_for_selector("#r-list li:has-text('door')")  # the graph file's rule, until the stream has its own
    page.click("#r-list li:has-text('door') button")
    page.fill("#r-id", "gate")
    page.click("#r-draw")
    box = page.locator("#s-canvas").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + 2)
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] - 2)
    page.click("#r-save")
    page.wait_for_selector("#r-saved:has-text('saved')")
    assert [r["id"] for r in svc.rules("cam1")] == ["gate"]
    page.wait_for_selector("#s-events li:has-text('cross · gate')", timeout=90_000)
    page.wait_for_function("() => { const r = document.querySelector('#s-counters tr[data-rule=gate]');"
                           " return r && Number(r.children[2].textContent) + Number(r.children[4].textContent) >= 1; }")
    page.wait_for_function("() => [...document.querySelectorAll('#s-events img')]"
                           ".some(i => !i.hidden && i.complete && i.naturalWidth > 0)")
    assert all(e["event"]["rule"] == "gate" for e in svc.events("cam1", "cross", None, 100)[:1])
    page.screenshot(path=str(artifacts() / "service_stream.png"))
    page.click("#s-remove")
    page.wait_for_selector("#view-streams:not([hidden])")
    page.wait_for_selector('.tile[data-stream="cam1"]', state="detached")
    assert svc.streams() == []


def test_tasks_page_shows_each_task_and_the_camera_form_picks_one(tmp_path, page):
    """A real service with two tasks defining their detector alike: the Tasks page draws both graphs with their live
    counters and says the detector is shared; a camera added with the form's task picker runs in that task."""
    from graphflow.serve.controller import Service
    from graphflow.serve.store import Store
    from graphflow.serve.task import build_task

    doc = json.loads((ROOT / "graphs" / "demo.json").read_text())
    del doc["engines"]["out"]
    doc["connections"] = [c for c in doc["connections"] if "out.in" not in c]
    crowd = json.loads((ROOT / "graphs" / "crowd.json").read_text())
    store = Store(tmp_path / "state.db")
    svc = Service(store, [VIDEO.parent])
    svc.start([build_task("demo", doc, str(tmp_path / "demo.json")),
               build_task("crowd", crowd, str(ROOT / "graphs" / "crowd.json"))])
    srv = Server(svc)
    try:
        page.goto(srv.url + "/")
        page.wait_for_selector("#add-task-label:not([hidden])")
        assert page.locator("#add-task option").all_inner_texts() == ["demo (default)", "crowd"]
        page.fill("#add-id", "gate")
        page.fill("#add-uri", str(VIDEO))
        page.check("#add-loop")
        page.check("#add-realtime")
        page.select_option("#add-task", "crowd")
        page.click("#add-submit")
        page.wait_for_selector('.tile[data-stream="gate"]')
        assert svc.stream("gate")["task"] == "crowd"
        page.click("#nav-tasks")
        page.wait_for_selector('article.task[data-task="crowd"] tr[data-engine="gate"]')
        page.wait_for_selector('article.task[data-task="demo"] td:has-text("shared by 2 tasks")')
        page.wait_for_function("() => { const i = document.querySelector('article.task[data-task=crowd] img');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        page.wait_for_function("() => { const r = document.querySelector("
                               "'article.task[data-task=crowd] tr[data-engine=det]');"
                               " return r && Number(r.children[4].textContent) > 0; }", timeout=60_000)
        assert "streams: gate" in page.locator('article.task[data-task="crowd"] p').inner_text()
        assert page.console_errors == []
        page.screenshot(path=str(artifacts() / "service_tasks.png"))
    finally:
        srv.close()
        svc.stop()
        store.close()


def test_docs_page_draws_every_path_of_the_openapi_schema(server, page):
    """`/docs` renders /openapi.json in a real browser, each path and method a block, with nothing from another
    host; the stream spec's fields show under POST /streams."""
    status, headers, body = get(f"{server.url}/docs")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "http://" not in body.decode() and "https://" not in body.decode()
    paths = json.loads(get(f"{server.url}/openapi.json")[2])["paths"]
    wanted = sorted((p, v) for p, item in paths.items() for v in ("get", "post", "put", "delete") if v in item)
    page.goto(server.url + "/docs")
    page.wait_for_selector(".op")
    drawn = page.eval_on_selector_all(".op", "ops => ops.map(o => [o.dataset.path, o.dataset.method])")
    assert sorted(map(tuple, drawn)) == wanted and ("/docs", "get") in wanted
    post = page.text_content('.op[data-path="/streams"][data-method="post"]')
    assert "request body: application/json" in post and '"realtime"' in post
    assert page.console_errors == []
