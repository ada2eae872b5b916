"""Alarm sinks, each event sent to a receiver at least once: `webhook` (an HTTP POST per event, optionally signed)
and `mqtt` (QoS 1 messages on topics per stream and rule, with a retained availability topic). Both are broker
sinks: a delivery thread, retries with back-off and, with `spool`, an on-disk queue kept across restarts."""
from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from typing import Any

from graphflow.engines.publish.base import at, dump, safe_name
from graphflow.engines.publish.brokers import BrokerSink

from graphflow import Engine, Message, Param, ParamError

RETRIED = (408, 425, 429)  # client-error statuses that mean "later", not "never"
SIGNATURE = "X-Graphflow-Signature"
TOPIC_LEVEL = re.compile(r"[^/+#\x00]+")


class Unavailable(ConnectionError):
    """The receiver is away or answered "not now"; the item is tried again later."""


def secret_from(field: str, value: str, env: str) -> bytes:
    """A key given directly or through the name of an environment variable; ParamError if that variable is unset."""
    if env:
        if env not in os.environ:
            raise ParamError(field, f"environment variable {env!r} is not set")
        return os.environ[env].encode()
    return value.encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is: an event is never re-posted somewhere else unseen."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookSink(BrokerSink):
    """POSTs each event (or frame record) as one JSON object to `url`. Each carries an `id` to de-duplicate on (also
    in the `X-Graphflow-Id` header) and, with a secret, `X-Graphflow-Signature: sha256=<hex HMAC-SHA256 of the
    body>`. A 2xx answer delivers it; no answer, 3xx, 408, 425, 429 or 5xx are retried with back-off; another 4xx
    refuses it for good (counted as lost). Evidence a rule attached to an event (its `evidence` key, e.g. snapshot
    or clip URLs) is part of the body as it is."""

    kind = "webhook"
    errors = (OSError, http.client.HTTPException)
    url = Param(str, doc="http:// or https:// URL each event is POSTed to")
    secret = Param(str, "", doc="key of the HMAC-SHA256 signature header ('' = unsigned)")
    secret_env = Param(str, "", doc="name of an environment variable holding the key (instead of `secret`)")
    headers = Param(dict, {}, doc="extra request headers, name: value")
    timeout = Param(float, 5.0, ge=0.01, le=300, doc="seconds a POST may wait on the receiver before it counts as down")
    batch = 50

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        super().check(field, spec)
        if not re.match(r"^https?://[^/\s]+", spec["url"]):
            raise ParamError(at(field, "url"), f"must be an http:// or https:// URL (got {spec['url']!r})")
        if spec["secret"] and spec["secret_env"]:
            raise ParamError(at(field, "secret_env"), "give the key in `secret` or `secret_env`, not both")
        secret_from(at(field, "secret_env"), spec["secret"], spec["secret_env"])
        bad = [k for k, v in spec["headers"].items()
               if not re.fullmatch(r"[!-9;-~]+", k) or not isinstance(v, str) or re.search(r"[\r\n\x00]", v)]
        if bad:
            raise ParamError(at(field, "headers"), f"must map header names to one-line strings (got {bad[0]!r})")

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        super().__init__(spec, owner, index, where)
        self.key = secret_from(self.field("secret_env"), self.secret, self.secret_env)
        self.opener = urllib.request.build_opener(_NoRedirect)

    @property
    def target(self) -> str:
        return self.url

    def items(self, msg: Message) -> list[list[str]]:
        return [[r["id"], dump(r)] for r in self.identified(msg)]

    def send(self, pending: deque[list[str]]) -> None:
        while pending:
            item_id, body = pending[0]
            self.post(item_id, body.encode())
            pending.popleft()

    def post(self, item_id: str, body: bytes) -> None:
        """One POST: returns when the receiver took the item or refused it for good; raises Unavailable else."""
        headers = {**self.headers, "Content-Type": "application/json", "X-Graphflow-Id": item_id}
        if self.key:
            headers[SIGNATURE] = "sha256=" + hmac.new(self.key, body, hashlib.sha256).hexdigest()
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                response.read(65536)  # what a receiver says back is not used; bounded
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code < 400 or exc.code >= 500 or exc.code in RETRIED:
                raise Unavailable(f"HTTP {exc.code} {exc.reason}") from None
            self.refuse(f"HTTP {exc.code} {exc.reason}")

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "refused": self.refused}


class MqttSink(BrokerSink):
    """Publishes each event (or frame record) as JSON with QoS 1 to `<prefix>/events/<stream>/<rule>` (frames:
    `<prefix>/frames/<stream>`); stream and rule ids appear as safe names (as in file names). `<prefix>/available`
    holds a retained `online` while connected and `offline` after a clean stop or, through the broker's last will, a
    lost connection. A message is delivered once the broker acknowledged it (PUBACK); a broker outage or restart is
    retried with back-off, the unacknowledged messages sent again with the same `id`."""

    kind = "mqtt"
    errors = (OSError,)
    host = Param(str, "127.0.0.1", doc="broker host name or address")
    port = Param(int, 1883, ge=1, le=65535, doc="broker TCP port")
    prefix = Param(str, "graphflow", doc="first topic levels (one per site or task, e.g. site1/graphflow)")
    client_id = Param(str, "", doc="MQTT client id, unique on the broker "
                                   "('' = graphflow-<engine>-<sink index>-<random>)")
    username = Param(str, "", doc="user name ('' = none)")
    password_env = Param(str, "", doc="name of an environment variable holding the password")
    keepalive = Param(int, 30, ge=5, le=3600, doc="seconds between keep-alive pings")
    timeout = Param(float, 5.0, ge=0.01, le=300, doc="seconds to connect or to get a message acknowledged before "
                                                      "the broker counts as down")

    @classmethod
    def check(cls, field: str, spec: dict[str, Any]) -> None:
        super().check(field, spec)
        if not all(TOPIC_LEVEL.fullmatch(level) for level in spec["prefix"].split("/")):
            raise ParamError(at(field, "prefix"), f"must be topic levels without +, # or empty levels "
                                                  f"(got {spec['prefix']!r})")
        if not spec["host"]:
            raise ParamError(at(field, "host"), "must be a host name or address")
        secret_from(at(field, "password_env"), "", spec["password_env"])

    def __init__(self, spec: dict[str, Any], owner: Engine, index: int, where: str | None = None) -> None:
        super().__init__(spec, owner, index, where)
        self.password = secret_from(self.field("password_env"), "", self.password_env).decode() or None
        self.available = f"{self.prefix}/available"
        self.client: Any = None  # a paho Client while connected; a new one per connection
        self.connack = threading.Event()
        # random per process: two tasks or replicas with the same engine id never take each other's connection
        self.default_id = f"graphflow-{safe_name(owner.id)[:32]}-{index}-{uuid.uuid4().hex[:8]}"

    @property
    def target(self) -> str:
        return f"mqtt://{self.host}:{self.port}/{self.prefix}"

    def topic(self, record: dict[str, Any]) -> str:
        if self.what == "frames":
            return f"{self.prefix}/frames/{safe_name(record['stream'])}"
        return f"{self.prefix}/events/{safe_name(record['stream'])}/{safe_name(record.get('rule'))}"

    def items(self, msg: Message) -> list[list[str]]:
        return [[self.topic(r), dump(r)] for r in self.identified(msg)]

    def connect(self) -> None:
        """A new connection with its last will; `online` is published (retained) once the broker accepted it."""
        import paho.mqtt.client as mqtt  # here: a process without an mqtt sink does not import it

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id or self.default_id,
                             clean_session=True, reconnect_on_failure=False)
        client.will_set(self.available, "offline", qos=1, retain=True)
        if self.username:
            client.username_pw_set(self.username, self.password)
        client.connect_timeout = self.timeout
        self.connack.clear()
        refused: list[str] = []

        def on_connect(_c: Any, _u: Any, _flags: Any, code: Any, _props: Any) -> None:
            if code.is_failure:
                refused.append(str(code))
            self.connack.set()
        client.on_connect = on_connect
        client.connect(self.host, self.port, self.keepalive)
        client.loop_start()
        self.client = client
        if not self.connack.wait(self.timeout) or refused:
            raise Unavailable(f"broker refused the connection ({refused[0]})" if refused else
                              f"no CONNACK within {self.timeout:g}s")
        self.acked([client.publish(self.available, "online", qos=1, retain=True)])

    def acked(self, infos: list[Any]) -> int:
        """How many of `infos` (in order) the broker acknowledged within the timeout, up to the first that it did
        not; Unavailable if that is not all of them."""
        deadline = time.monotonic() + self.timeout
        for n, info in enumerate(infos):
            try:
                info.wait_for_publish(max(deadline - time.monotonic(), 0.001))
            except (RuntimeError, ValueError) as exc:
                raise Unavailable(f"{exc} after {n} of {len(infos)} messages") from None
            if not info.is_published():
                raise Unavailable(f"no PUBACK within {self.timeout:g}s after {n} of {len(infos)} messages")
        return len(infos)

    def send(self, pending: deque[list[str]]) -> None:
        infos: list[Any] = []
        try:
            if self.client is None or not self.client.is_connected():
                self.hang_up()
                self.connect()
            infos = [self.client.publish(topic, body, qos=1) for topic, body in pending]
            self.acked(infos)
            pending.clear()
        except OSError:
            for info in infos:  # those acknowledged in order are delivered; the rest go again
                if not info.is_published():
                    break
                pending.popleft()
            self.hang_up()
            raise

    def hang_up(self, farewell: bool = False) -> None:
        """Drop the connection (a new one is made on the next try); with `farewell`, say `offline` first."""
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if farewell and client.is_connected():
                self.acked([client.publish(self.available, "offline", qos=1, retain=True)])
            client.disconnect()
        except OSError:
            pass
        finally:
            client.loop_stop()

    def release(self) -> None:
        self.hang_up(farewell=True)
