"""Alarm sinks with real receivers: a local HTTP server (http.server in a thread) that refuses or is away for a
while, a publisher restarted with a spooled backlog, and a real mosquitto broker (started on a free port with a
temporary config, restarted mid-run) read by a paho subscriber with QoS 1."""
from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from graphflow import Message, ParamError
from graphflow.engines.publish import Publish
from graphflow.engines.publish.base import safe_name
from graphflow.testing import run_engine

from test_publish import event_msgs, free_port, wait_for


class Receiver:
    """An HTTP receiver on `port`: answers `refuse` (a status) to the first `refusals` POSTs, then 200; records
    every body it took with its headers."""

    def __init__(self, port: int, refusals: int = 0, refuse: int = 500) -> None:
        self.took: list[tuple[dict, dict]] = []
        self.seen = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.seen += 1
                status = refuse if owner.seen <= refusals else 200
                if status == 200:
                    owner.took.append((json.loads(body), {**dict(self.headers), "raw": body}))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def hook(port: int, **more) -> dict:
    return {"kind": "webhook", "url": f"http://127.0.0.1:{port}/hook", "timeout": 2.0, **more}


def once_each(took: list[tuple[dict, dict]]) -> dict[str, dict]:
    """The events received, by id; a redelivery must be the same event."""
    seen: dict[str, dict] = {}
    for body, _ in took:
        assert seen.setdefault(body["id"], body) == body
    return seen


def test_webhook_delivers_every_event_through_refusals_and_a_closed_port(tmp_path):
    port = free_port()
    receivers: list[Receiver] = []
    engine = Publish("out", {"sinks": [hook(port, spool=str(tmp_path / "spool"))], "retry": 0.02, "retry_max": 0.1})

    def feed() -> Iterator[Message]:
        yield from event_msgs(4, "a")        # nobody listens: connection refused, spooled
        wait_for(lambda: engine.failures >= 2)
        receivers.append(Receiver(port, refusals=3))   # up, but answers 500 three times first
        yield from event_msgs(4, "b")
        wait_for(lambda: engine.metrics()["sinks"]["0:webhook"]["pending"] == 0)
        yield from event_msgs(2, "c")

    try:
        run_engine(engine, messages=feed())
    finally:
        for r in receivers:
            r.close()
    got = once_each(receivers[0].took)
    assert sorted((e["stream"], e["frame"]) for e in got.values()) == \
        [(s, i) for s, n in (("a", 4), ("b", 4), ("c", 2)) for i in range(n)]
    assert all(headers["X-Graphflow-Id"] == body["id"] and headers["Content-Type"] == "application/json"
               for body, headers in receivers[0].took)
    sink = engine.metrics()["sinks"]["0:webhook"]
    assert sink["written"] == 10 and sink["lost"] == 0 and sink["failures"] >= 3 and sink["spooled"] == 0


def test_webhook_signs_the_body_with_a_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("HOOK_KEY", "s3cret")
    port = free_port()
    receiver = Receiver(port)
    try:
        run_engine(Publish, {"sinks": [hook(port, secret_env="HOOK_KEY", headers={"X-Site": "yard"})]},
                   [Message(stream="cam1", seq=0, data={"events": [{"rule": "door", "event": "enter",
                                                                   "evidence": {"snapshot": "http://x/1.jpg"}}]})])
    finally:
        receiver.close()
    ((body, headers),) = receiver.took
    expected = "sha256=" + hmac.new(b"s3cret", headers["raw"], hashlib.sha256).hexdigest()
    assert headers["X-Graphflow-Signature"] == expected and headers["X-Site"] == "yard"
    assert body["evidence"] == {"snapshot": "http://x/1.jpg"} and body["rule"] == "door"


def test_webhook_counts_an_event_refused_for_good_as_lost(caplog):
    port = free_port()
    receiver = Receiver(port, refusals=1, refuse=400)
    engine = Publish("out", {"sinks": [hook(port)]})
    try:
        run_engine(engine, messages=event_msgs(3))
    finally:
        receiver.close()
    sink = engine.metrics()["sinks"]["0:webhook"]
    assert len(receiver.took) == 2 and sink["refused"] == 1 and sink["lost"] == 1 and sink["written"] == 2
    assert sum("refused an item: HTTP 400" in r.getMessage() for r in caplog.records) == 1


def test_a_restarted_webhook_publisher_delivers_its_spooled_backlog(tmp_path):
    port = free_port()
    spool = tmp_path / "spool"
    first = Publish("out", {"sinks": [hook(port, spool=str(spool), timeout=0.2)]})
    run_engine(first, messages=event_msgs(5))              # no receiver: all kept in the spool
    assert first.metrics()["lost"] == 0 and first.metrics()["sinks"]["0:webhook"]["spooled"] == 5
    receiver = Receiver(port)
    try:
        run_engine(Publish("out", {"sinks": [hook(port, spool=str(spool))]}), messages=event_msgs(1, "late"))
    finally:
        receiver.close()
    got = once_each(receiver.took)
    assert sorted((e["stream"], e["frame"]) for e in got.values()) == [("cam1", i) for i in range(5)] + [("late", 0)]


def test_webhook_over_https_verifies_the_receiver(tmp_path, monkeypatch):
    """https:// with the receiver's certificate checked against the trusted ones (here a self-signed one, trusted
    through SSL_CERT_FILE); an untrusted receiver is retried, not posted to."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port = free_port()
    receiver = Receiver(port)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    receiver.server.socket = context.wrap_socket(receiver.server.socket, server_side=True)
    url = f"https://127.0.0.1:{port}/hook"
    try:
        untrusted = Publish("out", {"sinks": [{"kind": "webhook", "url": url, "timeout": 2.0}], "retry": 0.0})
        run_engine(untrusted, messages=event_msgs(1))
        assert not receiver.took and "CERTIFICATE_VERIFY_FAILED" in untrusted.metrics()["sinks"]["0:webhook"]["error"]
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        run_engine(Publish, {"sinks": [{"kind": "webhook", "url": url, "timeout": 2.0}]}, event_msgs(2))
    finally:
        receiver.close()
    assert [body["frame"] for body, _ in receiver.took] == [0, 1]


@pytest.mark.parametrize("spec, field", [
    ({"kind": "webhook"}, "sinks[0].url"),
    ({"kind": "webhook", "url": "ftp://x"}, "sinks[0].url"),
    ({"kind": "webhook", "url": "http://x", "secret_env": "GRAPHFLOW_NO_SUCH_VARIABLE"}, "sinks[0].secret_env"),
    ({"kind": "webhook", "url": "http://x", "headers": {"X-A": 1}}, "sinks[0].headers"),
    ({"kind": "webhook", "url": "http://x", "headers": {"X-A": "a\r\nX-B: b"}}, "sinks[0].headers"),
    ({"kind": "mqtt", "prefix": "a/+/b"}, "sinks[0].prefix"),
    ({"kind": "mqtt", "prefix": ""}, "sinks[0].prefix"),
    ({"kind": "mqtt", "port": 0}, "sinks[0].port"),
])
def test_bad_alarm_keys_name_the_field(spec, field):
    with pytest.raises(ParamError) as err:
        Publish("pub", {"sinks": [spec]}).check()
    assert err.value.field == field and "\n" not in str(err.value)


# --- mqtt -----------------------------------------------------------------------------------------------------

class Mosquitto:
    """A real mosquitto on a loopback port with a temporary config; `restart` keeps the port."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto not installed")
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
            try:
                probe.connect("127.0.0.1", self.port)
                probe.disconnect()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class Subscriber:
    """A paho client subscribed with QoS 1 to `topic`, recording (topic, payload, retained) of what arrives."""

    def __init__(self, port: int, topic: str = "graphflow/#") -> None:
        self.got: list[tuple[str, str, bool]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.got.append((m.topic, m.payload.decode(), m.retain))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def events(self) -> list[tuple[str, dict]]:
        return [(t, json.loads(p)) for t, p, _ in self.got if "/events/" in t]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_sink(port: int, **more) -> dict:
    return {"kind": "mqtt", "port": port, "timeout": 2.0, **more}


def test_mqtt_publishes_qos1_events_on_stream_and_rule_topics_and_availability(tmp_path):
    broker = Mosquitto(tmp_path)
    sub = Subscriber(broker.port)
    try:
        engine = Publish("out", {"sinks": [mqtt_sink(broker.port)]})
        msgs = event_msgs(3) + [Message(stream="cam 2", seq=0, data={"events": [{"rule": "yard/gate", "event": "x"}]})]
        run_engine(engine, messages=msgs)
        wait_for(lambda: len(sub.events()) >= 4, 15)
        later = Subscriber(broker.port, "graphflow/available")   # a newcomer gets the retained state
        wait_for(lambda: later.got)
        later.close()
    finally:
        sub.close()
        broker.stop()
    events = sub.events()
    assert [(t, e["frame"]) for t, e in events[:3]] == [("graphflow/events/cam1/door", i) for i in range(3)]
    assert events[3][0] == f"graphflow/events/{safe_name('cam 2')}/{safe_name('yard/gate')}"   # one level each
    assert [p for t, p, _ in sub.got if t == "graphflow/available"] == ["online", "offline"]
    assert later.got == [("graphflow/available", "offline", True)]
    assert engine.metrics()["sinks"]["0:mqtt"]["written"] == 4 and engine.metrics()["lost"] == 0


def test_mqtt_broker_restart_mid_run_loses_nothing(tmp_path):
    broker = Mosquitto(tmp_path)
    subs = [Subscriber(broker.port)]
    engine = Publish("out", {"sinks": [mqtt_sink(broker.port, spool=str(tmp_path / "spool"), timeout=5.0)],
                             "retry": 60.0})

    def feed() -> Iterator[Message]:
        yield from event_msgs(3, "a")
        wait_for(lambda: len(subs[0].events()) >= 3, 15)
        broker.stop()                         # the broker goes away mid-run
        yield from event_msgs(3, "b")          # these wait in the spool; the next try is 60 s away
        wait_for(lambda: engine.failures >= 1, 15)
        broker.start()                        # back on the same port, empty
        subs.append(Subscriber(broker.port))   # flush at the end tries at once, back-off or not

    try:
        run_engine(engine, messages=feed())
        wait_for(lambda: len(subs[1].events()) >= 3, 15)
    finally:
        for s in subs:
            s.close()
        broker.stop()
    assert sorted({(e["stream"], e["frame"]) for _, e in subs[1].events()}) == [("b", i) for i in range(3)]
    sink = engine.metrics()["sinks"]["0:mqtt"]
    assert sink["lost"] == 0 and sink["spooled"] == 0 and sink["written"] == 6
