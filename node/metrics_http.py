"""The node's Prometheus door: ``GET /metrics`` on a small asyncio HTTP/1.1 server, and nothing else.

One request per connection (``Connection: close``), which is all a Prometheus scraper needs; the body
comes from an ``exposition()`` callable run on the event loop, where the node's state lives.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

# A scrape request is a few hundred bytes; anything longer or slower is not a scraper.
MAX_HEAD_BYTES = 16 * 1024
READ_TIMEOUT_S = 10.0
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

    def __init__(self, exposition: Callable[[], tuple[bytes, str]]) -> None:
        self._exposition = exposition
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.address = ""
        self.port = 0

    async def start(self, listen: str) -> str:
        """Binds ``listen`` (port 0: any free port) and returns the bound ``host:port``."""
        host, port = split_listen(listen)
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD_BYTES)
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
            status, body, content_type, send_body = await self._answer(reader)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Allow: GET, HEAD\r\n" if status == 405 else "")
                + "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (body if send_body else b""))
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
        except (ConnectionError, TimeoutError):
            pass  # the scraper went away or stalled: nothing to tell it
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes, str, bool]:
        """Status, body, content type, and whether the body is sent (not for HEAD)."""
        text = "text/plain; charset=utf-8"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return 400, b"bad request\n", text, True
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
