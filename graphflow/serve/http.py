"""The service's HTTP server: uvicorn, with bounds on what idle or slow clients may hold.

Uvicorn closes a connection idle between requests after `timeout_keep_alive`, but it sets no limit on a new
connection that sends nothing or a request head that never ends (slowloris): each would hold a socket and a file
descriptor for good; nor does it bound a head's size under httptools. HeadTimeout closes a connection whose
request head is not complete `HEAD_TIMEOUT_S` after it opened or after the head began, or that sent MAX_HEAD bytes
without completing one."""
from __future__ import annotations

from typing import Any

HEAD_TIMEOUT_S = 10.0  # a request head (request line and headers) must arrive within this
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MAX_HEAD = 64 * 1024  # bytes of a request head


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
        """Closes the connection when no request head completed within `head_timeout` s of the connection opening,
        or of the first bytes after the last answer: uvicorn makes a new `cycle` for each complete head."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            if self.head_deadline is None and (self.cycle is None or self.cycle.response_complete):
                self.arm_head_deadline()  # a next request begins
            super().data_received(data)
            if self.head_deadline is not None and self.cycle is self.head_of:  # still within the head
                self.head_bytes += len(data)
                if self.head_bytes > MAX_HEAD and not self.transport.is_closing():
                    self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
                                         b"Connection: close\r\n\r\n")
                    self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None
            super().connection_lost(exc)

        def arm_head_deadline(self) -> None:
            self.head_of, self.head_bytes = self.cycle, 0  # the request answered before this head, bytes of it
            self.head_deadline = self.loop.call_later(head_timeout, self.head_overdue)

        def head_overdue(self) -> None:
            self.head_deadline = None
            if self.cycle is self.head_of and not self.transport.is_closing():  # no head came since
                self.transport.close()

    return HeadTimeout
