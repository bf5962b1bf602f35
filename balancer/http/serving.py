"""Runs the HTTP shim's ASGI app on uvicorn inside the balancer's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from dataclasses import dataclass

import structlog
import uvicorn
from fastapi import FastAPI

from common.config import DEFAULT_HTTP_LIMITS, HttpLimits
from common.http_protocol import limited_protocol

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class HttpServer:
    """A started uvicorn server: the bound port and how to stop it."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int

    async def stop(self, grace: float = 5.0) -> None:
        self.server.should_exit = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.task), grace)
        if not self.task.done():
            self.server.force_exit = True
            await asyncio.gather(self.task, return_exceptions=True)


def _bound_socket(host: str, port: int, shared: bool) -> socket.socket:
    """The HTTP port, bound here rather than by uvicorn: uvicorn answers a bind failure with
    ``sys.exit`` inside its task, which escapes the event loop instead of reaching the caller.

    ``shared``: bound with SO_REUSEPORT too, so several worker processes accept on one port.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def start_http(
    app: FastAPI,
    listen: str,
    *,
    shared: bool = False,
    grace_s: float = 5.0,
    limits: HttpLimits = DEFAULT_HTTP_LIMITS,
) -> HttpServer:
    """Binds ``listen`` (host:port, port 0 picks one) and serves ``app`` until ``stop``.

    ``shared``: the port is bound with SO_REUSEPORT, for ``llmlb serve --workers``. ``limits``: what a
    connection may hold before its request reaches the app (``common/http_protocol.py``).
    """
    host, _, port = listen.rpartition(":")
    config = uvicorn.Config(
        app,
        host=host or "0.0.0.0",
        port=int(port),
        log_config=None,  # structlog owns logging
        access_log=False,
        lifespan="off",
        http=limited_protocol(limits),
        timeout_keep_alive=math.ceil(limits.keepalive_timeout_s),  # uvicorn counts whole seconds
        timeout_graceful_shutdown=max(1, round(grace_s)),  # then calls still running are cut
    )
    server = uvicorn.Server(config)
    # The balancer owns SIGINT/SIGTERM; uvicorn must not replace its handlers.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    sock = _bound_socket(host or "0.0.0.0", int(port), shared)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task  # raises the bind error
            raise OSError(f"cannot listen on {listen}")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    log.info("http.listening", http=f"{host}:{bound}")
    return HttpServer(server, task, bound)
