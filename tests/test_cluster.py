"""Streams over a Ray cluster: the Coordinator's placement rules (fast, no Ray), and a real local Ray cluster of 3
nodes behind `graphflow serve --ray` on a real uvicorn server, where killing a node moves its streams."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from graphflow.cluster.placement import Coordinator, NoCapacity, stream_labels
from graphflow.errors import GraphflowError

ROOT = Path(__file__).resolve().parents[1]


# the coordinator ------------------------------------------------------------------------------------------------
def cluster_of(*replicas: tuple[str, int, dict[str, Any]]) -> Coordinator:
    c = Coordinator()
    for rid, capacity, labels in replicas:
        c.add_replica(rid, capacity, labels)
    return c


def loads(c: Coordinator) -> dict[str, int]:
    return {rid: len(r.streams) for rid, r in c.replicas.items()}


def test_streams_spread_evenly_by_share_of_declared_capacity():
    c = cluster_of(("a", 4, {}), ("b", 8, {}), ("c", 4, {}))
    for i in range(12):
        c.place(f"s{i}")
    assert loads(c) == {"a": 3, "b": 6, "c": 3}  # the same share of capacity each
    assert sorted(c.where) == sorted(f"s{i}" for i in range(12))
    for i in range(12, 16):
        c.place(f"s{i}")
    with pytest.raises(NoCapacity, match="no replica has room for stream 's16'"):
        c.place("s16")
    assert "s16" not in c.where and not c.pending


def test_placement_is_deterministic_and_never_twice():
    def run() -> dict[str, str]:
        c = cluster_of(*((f"r{i}", 5, {"gpu": i % 2 == 0}) for i in range(7)))
        for i in range(20):
            c.place(f"s{i}", {"gpu": True} if i % 3 == 0 else None)
        return dict(c.where)
    assert run() == run()
    c = cluster_of(("a", 2, {}))
    c.place("s")
    with pytest.raises(ValueError, match="placed already"):
        c.place("s")
    assert loads(c) == {"a": 1}


def test_busy_share_steers_new_streams_away_from_a_loaded_replica():
    c = cluster_of(("a", 10, {}), ("b", 10, {}))
    c.place("s1")
    c.place("s2")
    assert loads(c) == {"a": 1, "b": 1}
    c.update_load("a", 0.6)  # a's one stream keeps its infer 60 % busy: a second would make it 120 %
    c.update_load("b", 0.1)
    assert [c.place(f"t{i}") for i in range(3)] == ["b", "b", "b"]
    c.update_load("b", 1.0)  # b's 4 streams fill its infer: a fifth would make it 125 %, a's second 120 %
    assert c.place("t3") == "a"


def test_labels_pick_matching_replicas_only():
    c = cluster_of(("cpu1", 8, {"gpu": False, "zone": "north"}), ("gpu1", 8, {"gpu": True, "zone": "south"}),
                   ("gpu2", 8, {"gpu": True, "zone": "north"}))
    assert {c.place(f"g{i}", {"gpu": True}) for i in range(4)} == {"gpu1", "gpu2"}
    assert c.place("n", {"gpu": True, "zone": "north"}) == "gpu2"
    assert c.place("free") == "cpu1"  # no labels asked: the least loaded
    with pytest.raises(NoCapacity, match="zone='east'"):
        c.place("e", {"zone": "east"})
    assert stream_labels({"node": {"gpu": True}}) == {"gpu": True}
    with pytest.raises(GraphflowError, match="streams.node: must be an object"):
        stream_labels({"node": ["gpu"]})


def test_a_lost_replicas_streams_move_to_survivors_and_wait_when_there_is_no_room():
    c = cluster_of(("a", 4, {}), ("b", 4, {}), ("c", 4, {}))
    for i in range(9):
        c.place(f"s{i}")
    on_b = c.streams_of("b")
    moved = c.lose_replica("b")
    assert set(moved) == on_b and all(r in ("a", "c", None) for r in moved.values())
    assert Counter(c.where.values()) == {"a": 4, "c": 4} and len(c.where) == 8
    waiting = [s for s, r in moved.items() if r is None]
    assert list(c.pending) == waiting and len(waiting) == 1
    assert c.lose_replica("b") == {}  # lost once only
    assert c.add_replica("d", 4) == {waiting[0]: "d"}  # a new (or returning) node takes what waited
    assert not c.pending and len(c.where) == 9
    assert c.remove(waiting[0]) == "d" and loads(c)["d"] == 0  # removing frees its place
    assert c.remove("nope") is None


def test_waiting_streams_keep_their_labels_and_their_order():
    c = Coordinator()
    assert c.place("x", {"gpu": True}, wait=True) is None
    assert c.place("y", wait=True) is None
    assert c.add_replica("cpu", 4, {"gpu": False}) == {"y": "cpu"}
    assert c.add_replica("gpu", 4, {"gpu": True}) == {"x": "gpu"}
    c.remove("x")
    assert c.place("x2", {"gpu": True}) == "gpu"


# single machine: Ray stays out -----------------------------------------------------------------------------------
def test_serve_without_ray_never_imports_it(tmp_path: Path):
    """A serve run in a Python where importing Ray fails: the service adds, runs and stops a stream all the same."""
    pytest.importorskip("uvicorn")
    from test_service import free_port, wait_for

    got = subprocess.run([sys.executable, "-c", "import sys, graphflow.serve.main, graphflow.serve.api, graphflow.cli; "
                          "assert 'ray' not in sys.modules"], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    make_clip(tmp_path / "clip.mp4")
    (tmp_path / "graph.json").write_text(json.dumps({"engines": {"src": {"type": "decode"}}, "connections": []}))
    port = free_port()
    script = ("import sys; sys.modules['ray'] = None\n"  # any `import ray` raises ImportError
              "from graphflow.cli import main\n"
              f"sys.exit(main(['serve', 'graph.json', '--port', '{port}', '--state', 'state.db']))")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        front = Front(f"http://127.0.0.1:{port}")
        wait_for(lambda: front.up(), timeout=60, what="the service")
        assert front.call("POST", "/streams", {"id": "a", "uri": "clip.mp4", "fps": 5, "loop": True})[0] == 201
        wait_for(lambda: front.call("GET", "/streams/a")[1]["frames"] > 3, what="frames")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "Traceback" not in out, out


# a real Ray cluster of 3 nodes -------------------------------------------------------------------------------------
NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20, "resources": {"graphflow_streams": 8}}
GRAPH = {
    "name": "cluster-test",
    "engines": {
        "src": {"type": "decode"},
        "det": {"type": "infer", "params": {"letterbox": True, "conf": 0.3, "threads": 1}},
        "trk": {"type": "track"},
        "zone": {"type": "rule", "params": {"rules": [
            {"id": "door", "kind": "line_cross", "line": [[0.5, 0.0], [0.5, 1.0]], "classes": ["person"]}]}},
    },
    "connections": [["src.out", "det.in"], ["det.out", "trk.in"], ["trk.out", "zone.in"]],
}


def make_clip(path: Path, seconds: float = 10.0) -> None:
    """The demo video, small and slow (320×180 at 5 fps): people crossing, cheap to decode and detect."""
    import av

    with av.open(str(ROOT / "graphs" / "data" / "demo.mp4")) as src, av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=5)
        video.width, video.height, video.pix_fmt = 320, 180, "yuv420p"
        for i, frame in enumerate(src.decode(video=0)):
            if frame.time is not None and frame.time >= seconds:
                break
            if i % 5 == 0:
                small = frame.to_ndarray(format="rgb24", width=320, height=180)
                out.mux(video.encode(av.VideoFrame.from_ndarray(small, format="rgb24")))
        out.mux(video.encode())


class Front:
    """A client of the service's REST API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, None if body is None else json.dumps(body).encode(),
                                     method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, text = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read()
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text.decode()

    def up(self) -> bool:
        try:
            return self.call("GET", "/readyz")[0] == 200
        except OSError:
            return False

    def streams(self) -> dict[str, dict[str, Any]]:
        return {s["id"]: s for s in self.call("GET", "/streams")[1]}


def live_event(url: str, timeout: float = 60.0) -> dict[str, Any]:
    """The first event on the service's live feed (Server-Sent Events)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(url + "/events/live", timeout=timeout) as feed:
        while time.monotonic() < deadline:
            line = feed.readline()
            if line.startswith(b"data:"):
                return json.loads(line[5:])
    raise AssertionError("no live event")


def snapshot(url: str, stream: str) -> bytes | None:
    """The dashboard's picture of a stream (None while there is none yet: 204)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/streams/{stream}/preview.jpg", timeout=30) as resp:
        return resp.read() if resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg" else None


@pytest.fixture
def ray_cluster() -> Any:
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # every node runs on this machine (Ray gives them this host's address, as it does for 127.0.0.1)
    head = {**NODE, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        workers = [cluster.add_node(**NODE) for _ in range(2)]
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_streams_spread_over_three_nodes_and_move_when_one_dies(ray_cluster: Any, tmp_path: Path):
    pytest.importorskip("uvicorn")
    prometheus = pytest.importorskip("prometheus_client.parser")
    from test_service import Server, wait_for

    cluster, workers = ray_cluster
    (tmp_path / "graph.json").write_text(json.dumps(GRAPH))
    make_clip(tmp_path / "clip.mp4")
    t0 = time.monotonic()
    server = Server(tmp_path, "--ray", cluster.address)
    front = Front(server.url)
    transcript: list[str] = []

    def note(line: str) -> None:
        transcript.append(f"{time.monotonic() - t0:7.2f} s  {line}")

    try:
        note(f"service ready with {len(front.call('GET', '/graph')[1]['replicas'])} replicas")
        ids = [f"cam{i:02d}" for i in range(12)]
        for sid in ids:
            spec = {"id": sid, "uri": str(tmp_path / "clip.mp4"), "fps": 2, "loop": True, "realtime": True}
            assert front.call("POST", "/streams", spec)[0] == 201
        assert front.call("POST", "/streams", {"id": "x", "uri": str(tmp_path / "clip.mp4"),
                                               "node": {"gpu": True}}) == (
            503, {"error": "no replica has room for stream 'x' with node gpu=True (3 live replicas)"})
        status, got = front.call("POST", "/streams", {"id": "y", "uri": str(tmp_path / "clip.mp4"), "colour": 1})
        assert status == 400 and "unknown field" in got["error"] and "\n" not in got["error"], got
        wait_for(lambda: all(s["frames"] > 2 for s in front.streams().values()), timeout=120, what="12 streams")
        before = front.streams()
        replicas = Counter(s["placement"]["replica"] for s in before.values())
        assert len(replicas) == 3 and set(replicas.values()) == {4}, replicas
        note(f"12 streams running, 4 on each of {sorted(replicas)}")

        # a stream of the node about to die gets its own rule: it must follow the stream
        victim = workers[0]
        doomed = sorted(s for s, st in before.items() if st["placement"]["node"].endswith(victim.node_id[:8]))
        assert len(doomed) == 4
        own = [{"id": "follows", "kind": "line_cross", "line": [[0.5, 0.0], [0.5, 1.0]]}]
        assert front.call("PUT", f"/streams/{doomed[0]}/rules", own) == (200, own)

        cluster.remove_node(victim)
        killed = time.time()
        note(f"node {victim.node_id[:8]} removed (raylet killed) with {', '.join(doomed)}")
        moved = wait_for(lambda: (lambda now: now if all(now[s]["moves"] == 1 for s in doomed) else None)(
            front.streams()), timeout=60, what="streams re-placed")
        note("re-placed: " + ", ".join(f"{s}→{moved[s]['placement']['replica']} (lost in flight: {moved[s]['lost']})"
                                       for s in doomed))
        assert all(moved[s]["moves"] == 0 for s in ids if s not in doomed)
        survivors = Counter(s["placement"]["replica"] for s in moved.values())
        assert len(survivors) == 2 and set(survivors.values()) == {6}, survivors
        wait_for(lambda: all(s["frames"] > moved[i]["frames"] + 2 for i, s in front.streams().items()),
                 timeout=90, what="every stream producing after the move")
        note("every stream's frames rise after the move")
        assert front.call("GET", f"/streams/{doomed[0]}/rules") == (200, own)
        wait_for(lambda: [e for e in front.call("GET", f"/events?stream={doomed[0]}")[1]
                          if e["event"]["rule"] == "follows" and e["ts"] > killed], timeout=90,
                 what="an event of the moved rule on the new node")
        note(f"{doomed[0]}'s own rule fires on its new node")
        assert live_event(server.url)["stream"] in ids  # replicas' events reach the front's live feed too
        jpeg = wait_for(lambda: snapshot(server.url, doomed[0]), timeout=30, what="a preview from the new node")
        assert jpeg[:3] == b"\xff\xd8\xff"
        note(f"dashboard preview of {doomed[0]} from its new node: {len(jpeg)} bytes")

        # no stream runs twice: one tracker state per stream over all replicas, one frames series per stream
        def held() -> int:
            return front.call("GET", "/graph")[1]["engines"]["trk"]["stats"]["streams_held"]
        wait_for(lambda: held() == 12, timeout=30, what="12 streams held by the trackers")
        def metrics() -> dict[str, Any]:
            return {f.name: f for f in prometheus.text_string_to_metric_families(front.call("GET", "/metrics")[1])}

        def series() -> Counter:
            return Counter(s.labels["stream"] for s in metrics()["graphflow_stream_frames"].samples
                           if s.name.endswith("_total"))
        wait_for(lambda: series() == {sid: 1 for sid in ids}, timeout=30, what="one frames series per stream")
        assert {s.labels["node"] for s in metrics()["graphflow_engine_in"].samples} == {
            n["node"] for n in front.call("GET", "/graph")[1]["replicas"]}

        # a node that comes back takes new streams; removing a stream frees it on its node
        cluster.add_node(**NODE)
        wait_for(lambda: len([r for r in front.call("GET", "/graph")[1]["replicas"] if r["ready"]]) == 3,
                 timeout=120, what="a replica on the new node")
        note("new node's replica ready")
        spec = {"id": "late", "uri": str(tmp_path / "clip.mp4"), "fps": 2, "loop": True, "realtime": True}
        assert front.call("POST", "/streams", spec)[0] == 201
        late = front.streams()["late"]["placement"]["replica"]
        assert late not in survivors
        assert front.call("DELETE", f"/streams/{ids[0]}") == (204, None)
        assert front.call("GET", f"/streams/{ids[0]}")[0] == 404
        wait_for(lambda: front.streams()["late"]["frames"] > 0, timeout=60, what="late running")
        wait_for(lambda: held() == 12 and ids[0] not in series(), timeout=30, what=f"{ids[0]} freed on its node")

        # a replica that dies on a live node: its stream moves, and the node gets a new replica
        pid = next(r["pid"] for r in front.call("GET", "/graph")[1]["replicas"] if r["replica"] == late)
        os.kill(pid, signal.SIGKILL)
        note(f"replica {late} killed (SIGKILL to pid {pid})")
        wait_for(lambda: front.streams()["late"]["moves"] == 1, timeout=60, what="late re-placed")
        note(f"late re-placed on {front.streams()['late']['placement']['replica']}")
        wait_for(lambda: len({r["replica"] for r in front.call("GET", "/graph")[1]["replicas"] if r["ready"]}
                             - set(survivors)) == 1, timeout=120, what="a new replica on that node")
        note("that node has a new replica")
        wait_for(lambda: held() == 12, timeout=30, what="late held once")
    finally:
        code = server.stop()
        print("\n".join(transcript))
    assert code == 3, server.log.read_text()  # frames in flight on the dead node were lost
