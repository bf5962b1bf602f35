"""The node's Prometheus door: prometheus_client's ASGI app at ``GET /metrics`` on uvicorn, and nothing else.

The app runs on the event loop, where the node's state lives. The port has the balancer HTTP door's
transport limits (``common/http_protocol.py``: head size and time, open connections, idle keep-alive),
its head size capped lower still.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog
import uvicorn
from prometheus_client import make_asgi_app
from prometheus_client.registry import Collector

from common.config import DEFAULT_HTTP_LIMITS, HttpLimits
from common.http_protocol import limited_protocol

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


def _bound_socket(host: str, port: int) -> socket.socket:
    """The port bound here, so a port in use raises ``OSError`` (uvicorn, binding it, would exit)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class MetricsHttpServer:
    """Serves ``registry`` at ``GET /metrics`` until ``stop``."""

    def __init__(self, registry: Collector, limits: HttpLimits = DEFAULT_HTTP_LIMITS) -> None:
        self._app = metrics_app(registry)
        self._limits = dataclasses.replace(
            limits, max_header_bytes=min(limits.max_header_bytes, MAX_HEAD_BYTES)
        )
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.address = ""
        self.port = 0

    async def start(self, listen: str) -> str:
        """Binds ``listen`` (port 0: any free port) and returns the bound ``host:port``."""
        host, port = split_listen(listen)
        sock = _bound_socket(host, port)
        config = uvicorn.Config(
            self._app,
            log_config=None,  # structlog owns logging
            access_log=False,
            lifespan="off",
            ws="none",
            proxy_headers=False,
            server_header=False,
            http=limited_protocol(self._limits),
            timeout_keep_alive=math.ceil(self._limits.keepalive_timeout_s),  # uvicorn counts whole seconds
            timeout_graceful_shutdown=STOP_GRACE_S,
        )
        server = uvicorn.Server(config)
        # The node owns SIGINT/SIGTERM; uvicorn must not replace its handlers.
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:  # uvicorn says nothing else when it is ready
            if task.done():
                sock.close()
                await task  # raises what stopped it
                raise OSError(f"cannot serve metrics on {listen}")
            await asyncio.sleep(0.01)
        self._server, self._task = server, task
        bound_host, self.port = sock.getsockname()[:2]
        self.address = join_address(bound_host, self.port)
        return self.address

    async def stop(self) -> None:
        """Stops listening and ends open connections (an idle scraper does not hold up the stop)."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), STOP_GRACE_S + 1)
        if not self._task.done():
            self._server.force_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
        self._server = self._task = None
