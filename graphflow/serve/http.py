"""The service's HTTP server: uvicorn, with bounds on what idle or slow clients may hold.

Uvicorn closes a connection idle between requests after `timeout_keep_alive`, but it sets no limit on a new
connection that sends nothing or a request head that never ends (slowloris): each would hold a socket and a file
descriptor for good. HeadTimeout closes a connection whose request head is not complete `HEAD_TIMEOUT_S` after it
opened or after the head began; `h11_max_incomplete_event_size` bounds a head's size under h11 (httptools caps it
itself)."""
from __future__ import annotations

from typing import Any

HEAD_TIMEOUT_S = 10.0  # a request head (request line and headers) must arrive within this
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MAX_HEAD = 16 * 1024  # bytes of a request head (h11)


def config(app: Any, host: str, port: int, head_timeout: float = HEAD_TIMEOUT_S) -> Any:
    """The uvicorn.Config serving `app` on host:port with the bounds above."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2,
                          timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEAD,
                          http=protocol(head_timeout))


def protocol(head_timeout: float) -> Any:
    """Uvicorn's HTTP protocol class (httptools when installed, else h11) with a request-head deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeadTimeout(Base):  # type: ignore[misc, valid-type]
        """Closes the connection when a request head is not complete `head_timeout` s after it could begin."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.head_deadline = self.loop.call_later(head_timeout, self.head_overdue)

        def data_received(self, data: bytes) -> None:
            if self.head_deadline is None and (self.cycle is None or self.cycle.response_complete):
                self.head_deadline = self.loop.call_later(head_timeout, self.head_overdue)  # a next request began
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self.cancel_head_deadline()
            super().on_headers_complete()

        def handle_events(self) -> None:  # h11: the head is complete once a request event came
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self.cancel_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self.cancel_head_deadline()
            super().connection_lost(exc)

        def cancel_head_deadline(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def head_overdue(self) -> None:
            self.head_deadline = None
            if self.cycle is None or self.cycle.response_complete:  # no request is being answered
                self.transport.close()

    return HeadTimeout
