"""The node's Prometheus door: ``GET /metrics`` on a small asyncio HTTP/1.1 server, and nothing else.

One request per connection (``Connection: close``), which is all a Prometheus scraper needs; the body
comes from an ``exposition()`` callable run on the event loop, where the node's state lives. The port
has the node's ``HttpLimits`` (head size and time, open connections), its head size capped lower still.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable

import structlog

from common.config import DEFAULT_HTTP_LIMITS, HttpLimits
from common.http_limits import HeadTooLarge, read_head, refuse_head, start_server

log = structlog.get_logger(__name__)

# A scrape request is a few hundred bytes; anything longer is not a scraper.
MAX_HEAD_BYTES = 16 * 1024
WRITE_TIMEOUT_S = 10.0  # a scraper that stops reading the answer is let go
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as the host and port ``asyncio.start_server`` takes."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsHttpServer:
    """Serves ``exposition()`` (body and content type) at ``GET /metrics`` until ``stop``."""

    def __init__(
        self, exposition: Callable[[], tuple[bytes, str]], limits: HttpLimits = DEFAULT_HTTP_LIMITS
    ) -> None:
        self._exposition = exposition
        self._limits = dataclasses.replace(
            limits, max_header_bytes=min(limits.max_header_bytes, MAX_HEAD_BYTES)
        )
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.address = ""
        self.port = 0

    async def start(self, listen: str) -> str:
        """Binds ``listen`` (port 0: any free port) and returns the bound ``host:port``."""
        host, port = split_listen(listen)
        self._server = await start_server(self._serve, host, port, self._limits, "node.metrics")
        bound_host, self.port = self._server.sockets[0].getsockname()[:2]
        self.address = join_address(bound_host, self.port)
        return self.address

    async def stop(self) -> None:
        """Stops listening and ends open connections (an idle scraper does not hold up the stop)."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # start_server runs each connection in its own task
        self._connections.add(task)
        try:
            try:
                answer = await self._answer(reader)
            except HeadTooLarge:
                await refuse_head(reader, writer, self._limits, "node.metrics")
                return
            if answer is None:
                return  # closed, or silent past the header timeout: nothing to tell it
            status, body, content_type, send_body = answer
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Allow: GET, HEAD\r\n" if status == 405 else "")
                + "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (body if send_body else b""))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (ConnectionError, TimeoutError):
            pass  # the scraper went away or stalled: nothing to tell it
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes, str, bool] | None:
        """Status, body, content type, and whether the body is sent (not for HEAD); None: no request."""
        text = "text/plain; charset=utf-8"
        head = await read_head(reader, self._limits, fresh=True)
        if head is None:
            return None
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"bad request\n", text, True
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != "/metrics":
            return 404, b"not found: the metrics are at /metrics\n", text, True
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", text, True
        try:
            body, content_type = self._exposition()
        except Exception:
            log.exception("metrics.scrape_failed")
            return 500, b"internal error; see the node log\n", text, True
        return 200, body, content_type, method != "HEAD"
