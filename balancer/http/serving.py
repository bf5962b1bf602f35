"""Runs the HTTP shim's ASGI app on uvicorn inside the balancer's event loop (``common.asgi_serving``)."""

from __future__ import annotations

import structlog
from fastapi import FastAPI

from common.asgi_serving import AsgiServer, serve_asgi
from common.config import DEFAULT_HTTP_LIMITS, HttpLimits

log = structlog.get_logger(__name__)


async def start_http(
    app: FastAPI,
    listen: str,
    *,
    shared: bool = False,
    grace_s: float = 5.0,
    limits: HttpLimits = DEFAULT_HTTP_LIMITS,
) -> AsgiServer:
    """Binds ``listen`` (host:port, port 0 picks one) and serves ``app`` until ``stop``.

    ``shared``: the port is bound with SO_REUSEPORT, for ``llmlb serve --workers``. ``limits``: what a
    connection may hold before its request reaches the app (``common/http_protocol.py``). A taken port
    raises ``OSError``.
    """
    host, _, port = listen.rpartition(":")
    started = await serve_asgi(
        app,
        host or "0.0.0.0",
        int(port),
        limits,
        graceful_s=max(1, round(grace_s)),  # then calls still running are cut
        shared=shared,
    )
    log.info("http.listening", http=f"{host}:{started.port}")
    return started
