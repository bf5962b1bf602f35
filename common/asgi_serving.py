"""An ASGI app served by uvicorn inside the caller's event loop, on a port bound here, with a port's
transport limits (``common.http_protocol``): the balancer's HTTP door and a node's metrics port.

The port is bound before uvicorn starts: uvicorn answers a bind failure with ``sys.exit`` inside its
task, which escapes the event loop instead of reaching the caller; bound here, a taken port is an
``OSError`` for the caller to report. uvicorn never installs its own signal handlers: the process owns
SIGINT and SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn

from common.config import HttpLimits
from common.http_protocol import limited_protocol


@dataclass(slots=True)
class AsgiServer:
    """A started uvicorn server: where it listens and how to stop it."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    host: str  # as bound
    port: int

    async def stop(self, wait_s: float) -> None:
        """Stops listening; requests in flight get up to ``wait_s`` seconds, then connections are cut."""
        self.server.should_exit = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.task), wait_s)
        if not self.task.done():
            self.server.force_exit = True
            await asyncio.gather(self.task, return_exceptions=True)


def bound_socket(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """``host:port`` bound (port 0: any free port). ``shared``: with SO_REUSEPORT too, so several worker
    processes accept on one port."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_asgi(
    app: Any,
    host: str,
    port: int,
    limits: HttpLimits,
    *,
    graceful_s: int,
    shared: bool = False,
    **options: Any,
) -> AsgiServer:
    """Serves ``app`` on ``host:port`` until ``stop``; returns once uvicorn is accepting.

    ``graceful_s``: how long uvicorn's own shutdown lets requests finish; ``options``: more
    ``uvicorn.Config`` settings for this port.
    """
    config = uvicorn.Config(
        app,
        log_config=None,  # structlog owns logging
        access_log=False,
        lifespan="off",
        http=limited_protocol(limits),
        timeout_keep_alive=math.ceil(limits.keepalive_timeout_s),  # uvicorn counts whole seconds
        timeout_graceful_shutdown=graceful_s,
        **options,
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    sock = bound_socket(host, port, shared=shared)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn says nothing else when it is ready
        if task.done():
            sock.close()
            await task  # raises what stopped it
            raise OSError(f"cannot serve on {host}:{port}")
        await asyncio.sleep(0.01)
    bound_host, bound_port = sock.getsockname()[:2]
    return AsgiServer(server, task, bound_host, bound_port)
