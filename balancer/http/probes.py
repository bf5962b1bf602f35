"""Liveness, readiness and the Prometheus scrape: the routes that need no key."""

from __future__ import annotations

import asyncio

import structlog
from starlette.requests import Request
from starlette.responses import Response

from balancer.http.openai_answers import dumps
from balancer.http.route_table import Handlers
from balancer.parts import BalancerParts
from common.errors import ErrorCode, LlmlbError

log = structlog.get_logger(__name__)
STORE_CHECK_TIMEOUT_S = 2.0


def probe_routes(parts: BalancerParts) -> Handlers:
    """``/healthz`` (the process lives), ``/readyz`` (the store answers), ``/metrics``."""

    async def healthz(request: Request) -> Response:
        return Response(dumps({"status": "ok"}), media_type="application/json")

    async def readyz(request: Request) -> Response:
        try:
            nodes = await asyncio.wait_for(parts.store.list_nodes(), STORE_CHECK_TIMEOUT_S)
        except Exception as exc:  # any failure to answer means not ready; the reason goes to the log
            log.warning("http.not_ready", error=repr(exc))
            error = LlmlbError(ErrorCode.UNAVAILABLE, "the metadata store is not answering")
            return Response(
                dumps({"status": "not_ready", **error.to_openai()}),
                status_code=503,
                media_type="application/json",
            )
        body = {
            "status": "ready",
            "nodes": {"registered": len(nodes), "online": len(parts.fleet.online())},
            "models": len(await parts.catalog.list_models()),
        }
        return Response(dumps(body), media_type="application/json")

    async def metrics(request: Request) -> Response:
        body, content_type = parts.metrics.exposition()
        return Response(body, headers={"content-type": content_type})

    return {"healthz": healthz, "readyz": readyz, "metrics": metrics}
