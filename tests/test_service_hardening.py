"""`graphflow serve` against hostile or broken surroundings, through a real server on 127.0.0.1: stream ids, the
state file (corrupt, read-only, full, shared), the token on reads, redacted credentials, cross-site requests and
DNS rebinding, odd bodies, many live clients and idle connections. The graph is light (decode → a no-box engine →
rule) so that each case starts quickly; the real video is decoded."""
from __future__ import annotations

import http.client
import json
import os
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from test_service import DEMO, Server, free_port, wait_for

pytest.importorskip("uvicorn")

NO_BOXES = '''
from graphflow import Engine


class NoBoxes(Engine):
    """Frames with an empty track list, so the rule engine runs without a detector."""

    inputs = ("in",)
    outputs = ("out",)

    def process(self, msg):
        msg.data["tracks"] = []
        self.send(msg)
'''
GRAPH = {
    "name": "light",
    "engines": {"src": {"type": "decode", "params": {"sources": []}},
                "boxes": {"type": "noboxes:NoBoxes"},
                "zone": {"type": "rule", "params": {"rules": [
                    {"id": "door", "kind": "line_cross", "line": [[0.5, 0.0], [0.5, 1.0]]}]}}},
    "connections": [["src.out", "boxes.in"], ["boxes.out", "zone.in"]],
    "settings": {"shutdown_timeout": 5},
}
LINE = [{"id": "gate", "kind": "line_cross", "line": [[0.3, 0.0], [0.3, 1.0]]}]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "graph.json").write_text(json.dumps(GRAPH))
    (tmp_path / "noboxes.py").write_text(NO_BOXES)
    shutil.copy(DEMO, tmp_path / "clip.mp4")
    return tmp_path


def spec(site: Path, stream: str = "cam1", **extra: Any) -> dict[str, Any]:
    return {"id": stream, "uri": str(site / "clip.mp4"), "fps": 10, "loop": True, "realtime": True, **extra}


def request(server: Server, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request with exactly the headers given (urllib adds its own)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {"Host": f"127.0.0.1:{server.port}", **(headers or {})}.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body)
        resp = conn.getresponse()
        text = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(text) if text else None
    except ValueError:
        return resp.status, text


def one_line_error(got: tuple[int, Any], status: int, text: str) -> None:
    assert got[0] == status and text in got[1]["error"] and "\n" not in got[1]["error"], got


def serve_fails(site: Path, state: Path, *extra: str) -> list[str]:
    """Run `graphflow serve` expecting it to refuse to start: exit 2, its stderr lines."""
    run = subprocess.run([sys.executable, "-m", "graphflow", "serve", str(site / "graph.json"), "--port",
                          str(free_port()), "--state", str(state), *extra], cwd=site, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    return run.stderr.strip().splitlines()


# ids ---------------------------------------------------------------------------------------------------------------
def test_stream_ids_are_a_safe_charset_and_restored_rows_are_checked_like_a_post(site: Path):
    server = Server(site)
    try:
        for bad in ("x" * 60_000, "a/b", "..", ".hidden", "-rf", "_x", "<script>", "a\nb", "a b", "", "x" * 65, 7):
            one_line_error(server.call("POST", "/streams", spec(site, bad)), 400, "streams.id: must be 1 to 64 of")
        assert server.call("GET", "/streams") == (200, [])
        assert server.call("POST", "/streams", spec(site, "Cam.1_x-2"))[0] == 201
        assert server.call("POST", "/streams", spec(site, "x" * 64))[0] == 201
        one_line_error(server.call("POST", "/streams", spec(site, "cam.1_X-2")), 409, "would share file names")
        assert server.call("DELETE", "/streams/Cam.1_x-2") == (204, None)
    finally:
        assert server.stop() == 0, server.log.read_text()

    # rows put in the state file behind the service's back: a bad id, a file outside the media roots, a fifo,
    # a row that does not decode; each is reported in one line and skipped, the good one restored
    os.mkfifo(site / "pipe.mp4")
    db = sqlite3.connect(site / "state.db")
    for stream, row in (("a/b", json.dumps(spec(site, "a/b"))), ("etc", json.dumps(spec(site, "etc", uri="/etc/passwd"))),
                        ("pipe", json.dumps(spec(site, "pipe", uri=str(site / "pipe.mp4")))), ("junk", "{not json")):
        db.execute("INSERT INTO streams (id, spec, rules, added) VALUES (?, ?, NULL, 0)", (stream, row))
    db.commit()
    db.close()
    server = Server(site)
    try:
        assert [s["id"] for s in server.call("GET", "/streams")[1]] == ["x" * 64]
        log = server.log.read_text()
        for stream, why in (("a/b", "streams.id: must be"), ("etc", "is not under a media root"),
                            ("pipe", "is not a regular file"), ("junk", "its row does not decode")):
            lines = [line for line in log.splitlines() if f"{stream!r}" in line and "not restored" in line]
            assert len(lines) == 1 and why in lines[0], (stream, log)
        assert "Traceback" not in log
    finally:
        assert server.stop() == 0, server.log.read_text()


# the state file ----------------------------------------------------------------------------------------------------
def test_a_broken_or_shared_state_file_is_one_line_and_exit_2(site: Path):
    (site / "junk.db").write_bytes(os.urandom(8192))
    lines = serve_fails(site, site / "junk.db")
    assert len(lines) == 1 and lines[0].startswith(f"error: {site / 'junk.db'}: cannot use the state file"), lines

    server = Server(site)  # a good file with a stream, then cut in half
    try:
        assert server.call("POST", "/streams", spec(site))[0] == 201
        lines = serve_fails(site, site / "state.db")  # a second service on the same state file
        assert lines == [f"error: {site / 'state.db'}: the state file is in use by another graphflow serve "
                         f"(it holds {site / 'state.db'}.lock)"], lines
    finally:
        assert server.stop() == 0, server.log.read_text()
    data = (site / "state.db").read_bytes()
    (site / "cut.db").write_bytes(data[: len(data) // 2])
    lines = serve_fails(site, site / "cut.db")
    assert len(lines) == 1 and "cannot use the state file" in lines[0], lines


def tmpfs(folder: Path, size: str) -> None:
    folder.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.decode().strip()}")


def umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_state_file_is_one_line_and_exit_2(site: Path):
    disk = site / "ro"
    tmpfs(disk, "1m")
    try:
        server = Server(site, "--state", str(disk / "state.db"))
        assert server.stop() == 0
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        lines = serve_fails(site, disk / "state.db")
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
    finally:
        umount(disk)


def fill(disk: Path) -> Path:
    """Fill the file system of `disk` to its last byte; the filler's path."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 1024)
        except OSError:
            pass
    return filler


def test_on_a_full_disk_each_change_is_saved_and_applied_or_neither(site: Path):
    disk = site / "small"
    tmpfs(disk, "256k")
    try:
        full_disk(site, disk)
    finally:
        umount(disk)


def full_disk(site: Path, disk: Path) -> None:
    server = Server(site, "--state", str(disk / "state.db"))
    try:
        assert server.call("POST", "/streams", spec(site, "cam1"))[0] == 201
        wait_for(lambda: server.call("GET", "/streams/cam1")[1]["frames"] > 0, what="cam1 running")
        filler = fill(disk)

        one_line_error(server.call("DELETE", "/streams/cam1"), 507, "the change was not saved, nothing applied")
        before = server.call("GET", "/streams/cam1")[1]["frames"]
        wait_for(lambda: server.call("GET", "/streams/cam1")[1]["frames"] > before + 3, what="cam1 going on")

        one_line_error(server.call("PUT", "/streams/cam1/rules", LINE), 507, "not saved")
        assert server.call("GET", "/streams/cam1/rules")[1][0]["id"] == "door"

        one_line_error(server.call("POST", "/streams", spec(site, "cam2")), 507, "not saved")
        assert [s["id"] for s in server.call("GET", "/streams")[1]] == ["cam1"]
        time.sleep(1.0)
        assert "cam2" not in json.dumps(server.call("GET", "/graph")[1])

        filler.unlink()
        assert server.call("PUT", "/streams/cam1/rules", LINE) == (200, LINE)
        assert server.call("POST", "/streams", spec(site, "cam2"))[0] == 201
        assert server.call("DELETE", "/streams/cam1") == (204, None)
    finally:
        assert server.stop() == 0, server.log.read_text()
    server = Server(site, "--state", str(disk / "state.db"))  # the file says what the service did
    try:
        assert [s["id"] for s in server.call("GET", "/streams")[1]] == ["cam2"]
    finally:
        assert server.stop() == 0, server.log.read_text()


# who may ask -------------------------------------------------------------------------------------------------------
def test_with_a_token_reads_need_it_too(site: Path):
    server = Server(site, "--token", "s3cret")
    try:
        assert server.call("POST", "/streams", spec(site), token="s3cret")[0] == 201
        for path in ("/streams", "/streams/cam1", "/streams/cam1/rules", "/events", "/events/live", "/graph",
                     "/metrics", "/streams/cam1/preview.jpg", "/streams/cam1/preview.mjpg", "/graph.png"):
            one_line_error(request(server, "GET", path), 401, "missing or wrong token")
            one_line_error(request(server, "GET", path, headers={"Authorization": "Bearer nope"}), 401, "token")
        assert server.call("GET", "/streams", token="s3cret")[0] == 200
        assert request(server, "GET", "/streams?token=s3cret")[0] == 200  # for <img> and EventSource
        assert request(server, "GET", "/streams/cam1/preview.jpg?token=s3cret")[0] in (200, 204)
        one_line_error(request(server, "DELETE", "/streams/cam1?token=s3cret"), 401, "token")  # changes: header
        for path in ("/healthz", "/readyz", "/", "/web/app.js", "/openapi.json"):
            assert request(server, "GET", path)[0] == 200, path
    finally:
        assert server.stop() == 0, server.log.read_text()
    server = Server(site, "--token", "s3cret", "--metrics-open")
    try:
        status, text = request(server, "GET", "/metrics")
        assert status == 200 and b"graphflow_stream_frames" in text
        assert request(server, "GET", "/streams")[0] == 401
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_credentials_are_redacted_where_shown_and_kept_where_stored(site: Path):
    doc = json.loads((site / "graph.json").read_text())
    doc["engines"]["src"]["placement"] = "process"  # its log lines come from a process of its own
    (site / "graph.json").write_text(json.dumps(doc))
    server = Server(site)
    try:
        cam = {"id": "door", "uri": "rtsp://admin:hunter2@127.0.0.1:9/live"}  # nothing listens: it retries
        status, added = server.call("POST", "/streams", cam)
        assert status == 201 and added["uri"] == "rtsp://***@127.0.0.1:9/live"
        wait_for(lambda: "127.0.0.1:9/live: cannot open" in server.log.read_text(), what="a log line on the camera")
        shown = json.dumps([server.call("GET", "/streams")[1], server.call("GET", "/streams/door")[1],
                            server.call("GET", "/graph")[1]])
        assert "hunter2" not in shown and "admin" not in shown and "rtsp://***@127.0.0.1:9/live" in shown
    finally:
        assert server.stop() == 0, server.log.read_text()
    assert "hunter2" not in server.log.read_text()
    stored = sqlite3.connect(site / "state.db").execute("SELECT spec FROM streams").fetchone()[0]
    assert json.loads(stored)["uri"] == cam["uri"]


def test_other_sites_and_rebound_names_are_refused(site: Path):
    server = Server(site)
    try:
        body = json.dumps(spec(site)).encode()
        one_line_error(request(server, "POST", "/streams", body, {"Content-Type": "text/plain"}), 415,
                       "must be sent as application/json")
        one_line_error(request(server, "POST", "/streams", body), 415, "no Content-Type")
        one_line_error(request(server, "POST", "/streams", body, {"Content-Type": "application/json",
                                                                 "Origin": "http://evil.example"}), 403,
                       "requests from 'http://evil.example' are not allowed")
        one_line_error(request(server, "GET", "/streams", headers={"Host": f"evil.example:{server.port}"}), 403,
                       "is not this service's address")
        one_line_error(request(server, "GET", "/streams", headers={"Origin": "null"}), 403, "not allowed")
        assert server.call("GET", "/streams") == (200, [])
        same = {"Content-Type": "application/json; charset=utf-8", "Origin": f"http://127.0.0.1:{server.port}"}
        assert request(server, "POST", "/streams", body, same)[0] == 201
        assert request(server, "GET", "/streams", headers={"Host": f"localhost:{server.port}"})[0] == 200
    finally:
        assert server.stop() == 0, server.log.read_text()
    server = Server(site, "--allow-host", "cams.example")  # behind a reverse proxy that passes its own Host
    try:
        assert request(server, "GET", "/streams", headers={"Host": "cams.example"})[0] == 200
        assert request(server, "GET", "/streams", headers={"Host": "evil.example"})[0] == 403
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_deep_duplicate_and_odd_bodies_get_one_line_400s(site: Path):
    os.mkfifo(site / "pipe.mp4")
    server = Server(site)
    try:
        deep = b"[" * 30_000 + b"]" * 30_000
        one_line_error(server.call("POST", "/streams", raw=deep), 400, "body is not JSON")
        one_line_error(server.call("PUT", "/streams/x/rules", raw=b"[" * 33 + b"]" * 33), 400,
                       "nest deeper than 32")
        one_line_error(server.call("POST", "/streams", raw=b'{"id": "a", "id": "b", "uri": "x"}'), 400,
                       "duplicate key 'id'")
        one_line_error(server.call("POST", "/streams", {"id": "p", "uri": str(site / "pipe.mp4")}), 400,
                       "is not a regular file")
        assert server.call("GET", "/streams") == (200, [])
        assert "Traceback" not in server.log.read_text()
    finally:
        assert server.stop() == 0, server.log.read_text()


# many clients ------------------------------------------------------------------------------------------------------
def open_sse(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET /events/live HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    return sock


def test_sixty_live_event_clients_do_not_slow_the_api(site: Path):
    server = Server(site)
    clients: list[socket.socket] = []
    try:
        assert server.call("POST", "/streams", spec(site))[0] == 201
        clients = [open_sse(server.port) for _ in range(60)]
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            assert server.call("GET", "/streams")[0] == 200
            times.append(time.perf_counter() - t0)
        times.sort()
        p95 = times[int(0.95 * (len(times) - 1))]
        assert p95 < 0.5, times
    finally:
        for sock in clients:
            sock.close()
        assert server.stop() == 0, server.log.read_text()


def test_idle_and_slow_connections_are_closed_after_the_head_timeout(site: Path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 3000:
        pytest.skip("needs 3000 file descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 3000), hard))
    server = Server(site)
    idle: list[socket.socket] = []
    try:
        for i in range(1200):  # half say nothing, half start a request head and never end it
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            if i % 2:
                sock.sendall(b"GET /streams HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            idle.append(sock)
        t0 = time.perf_counter()
        assert server.call("GET", "/streams")[0] == 200
        assert time.perf_counter() - t0 < 2.0
        from graphflow.serve.http import HEAD_TIMEOUT_S, MAX_HEAD

        huge = socket.create_connection(("127.0.0.1", server.port), timeout=30)  # a head that never ends, fast
        try:
            huge.sendall(b"GET /streams HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: " + b"p" * (MAX_HEAD + 1024))
            assert huge.recv(1024).startswith(b"HTTP/1.1 431")
        finally:
            huge.close()

        deadline = time.monotonic() + HEAD_TIMEOUT_S + 20
        for sock in idle:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            assert sock.recv(1024) == b"", "the server keeps an idle connection open"
    finally:
        for sock in idle:
            sock.close()
        assert server.stop() == 0, server.log.read_text()
