"""The node's Prometheus door: prometheus_client's ASGI app at ``GET /metrics`` on uvicorn, and nothing else.

The app runs on the event loop, where the node's state lives. The port has the balancer HTTP door's
transport limits (``common/http_protocol.py``: head size and time, open connections, idle keep-alive),
its head size capped lower still.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog
from prometheus_client import make_asgi_app
from prometheus_client.registry import Collector

from common.asgi_serving import AsgiServer, serve_asgi
from common.config import DEFAULT_HTTP_LIMITS, HttpLimits

log = structlog.get_logger(__name__)

# A scrape request is a few hundred bytes; anything longer is not a scraper.
MAX_HEAD_BYTES = 16 * 1024
STOP_GRACE_S = 2  # a scrape in flight when the node stops gets this long to finish

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as the host and port to bind."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _plain(send: Send, status: int, text: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(text)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": text})


class _SizedSend:
    """``send`` that gives a one-part answer its ``Content-Length``: prometheus_client leaves it out and
    uvicorn would chunk the body, so a HEAD would not tell the size nor a kept-alive scraper a plain body."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._start: Message | None = None
        self.sent = False  # whether any of the answer went out

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._start = message
            return
        if self._start is not None:
            headers = list(self._start.get("headers", []))
            if not message.get("more_body", False):
                headers.append((b"content-length", str(len(message.get("body", b""))).encode()))
            start, self._start = self._start, None
            self.sent = True
            await self._send({**start, "headers": headers})
        await self._send(message)


def metrics_app(registry: Collector) -> Asgi:
    """``registry`` at ``GET``/``HEAD /metrics`` by prometheus_client's app (format negotiation, gzip,
    ``name[]`` filters); 404 on any other path, 405 for any other method, 500 when a collector fails."""
    scrape = make_asgi_app(registry)

    async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and websockets are not served: nothing else comes
        if scope["path"] != "/metrics":
            await _plain(send, 404, b"not found: the metrics are at /metrics\n")
        elif scope["method"] not in ("GET", "HEAD"):
            await _plain(send, 405, b"method not allowed\n", ((b"allow", b"GET, HEAD"),))
        else:
            sized = _SizedSend(send)
            try:
                await scrape(scope, receive, sized)
            except Exception:
                log.exception("metrics.scrape_failed")
                if not sized.sent:
                    await _plain(send, 500, b"internal error; see the node log\n")

    return app


class MetricsHttpServer:
    """Serves ``registry`` at ``GET /metrics`` until ``stop``."""

    def __init__(self, registry: Collector, limits: HttpLimits = DEFAULT_HTTP_LIMITS) -> None:
        self._app = metrics_app(registry)
        self._limits = dataclasses.replace(
            limits, max_header_bytes=min(limits.max_header_bytes, MAX_HEAD_BYTES)
        )
        self._server: AsgiServer | None = None
        self.address = ""
        self.port = 0

    async def start(self, listen: str) -> str:
        """Binds ``listen`` (port 0: any free port) and returns the bound ``host:port``."""
        host, port = split_listen(listen)
        self._server = await serve_asgi(
            self._app,
            host,
            port,
            self._limits,
            graceful_s=STOP_GRACE_S,
            ws="none",
            proxy_headers=False,
            server_header=False,
        )
        self.port = self._server.port
        self.address = join_address(self._server.host, self.port)
        return self.address

    async def stop(self) -> None:
        """Stops listening and ends open connections (an idle scraper does not hold up the stop)."""
        if self._server is None:
            return
        await self._server.stop(STOP_GRACE_S + 1)
        self._server = None
