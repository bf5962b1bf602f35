"""uvicorn's httptools protocol with a port's transport limits (``HttpLimits``), for the uvicorn ports:
the balancer's HTTP door and a node's metrics port.

uvicorn bounds neither the size of a request's head nor the time it takes to arrive (httptools keeps
whatever header bytes come), nor the connections it holds; it bounds only the idle time between
kept-alive requests, which each port's uvicorn config sets from the same limits. This protocol adds the rest,
before any byte reaches the app:

- a head (request line and headers) over ``max_header_bytes`` is answered 431 and the connection
  closes: counted as bytes arrive, so an unfinished head is never held past the limit (plus one read);
- a head not complete within ``header_timeout_s`` of the connection (or of a kept-alive request's
  first byte) closes the connection;
- past ``max_connections`` open connections, a new one is closed as soon as it is accepted.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import structlog
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from common.config import HttpLimits
from common.http_limits import LINGER_S, error_bytes, headers_too_large

log = structlog.get_logger(__name__)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """One connection of a uvicorn port; ``limited_protocol`` binds the limits."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True  # the next bytes belong to a request's head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered 431: what still comes is dropped until the connection closes
        self._boundary = False  # a head or a whole request ended within the read being parsed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("http.connections_full", limit=self.limits.max_connections)
            transport.abort()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._boundary = False
        super().data_received(data)
        # A read that lies wholly within a head counts whole. One across a boundary is not counted:
        # a head that ended in it was measured in on_headers_complete, and the start of the next
        # head that began in it is at most one read (256 KiB), a bounded overshoot.
        if self._in_head and not self._boundary and not self._refused:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head()

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._in_head = True
        self._arm_head_timer()  # a kept-alive request's first byte: its head's time starts now
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        # A head that arrived in one read is measured here, from what was parsed.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._refuse_head()
            return
        self._disarm_head_timer()
        self._in_head = False
        self._boundary = True
        self._head_bytes = 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._in_head = True  # what follows is the next request's head
        self._boundary = True
        self._head_bytes = 0

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        log.info("http.header_timeout", timeout_s=self.limits.header_timeout_s)
        self.shutdown()  # closes now, or after the response in flight if a pipelined head is late

    def _refuse_head(self) -> None:
        """431 with the house error, then close once the rest of the head has been read and dropped
        (closing with bytes unread would reset the connection and could lose the answer)."""
        self._refused = True
        self._disarm_head_timer()
        self._unset_keepalive_if_required()
        log.info("http.headers_too_large", limit=self.limits.max_header_bytes)
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a response in flight: that response ends the connection.
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self.transport.write(error_bytes(headers_too_large(self.limits.max_header_bytes)))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def limited_protocol(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to ``limits``."""
    return type("HttpDoorProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})
