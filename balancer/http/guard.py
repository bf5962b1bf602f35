"""Who may call: every HTTP route is wrapped with its row's access rule, checked before it runs.

Handlers never authorize by hand. The rules are the route table's (``route_table.HTTP_ACCESS``); a
route no row declares is refused for every caller, so a route served some other way stays closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from balancer.auth import KeyRing
from balancer.edge.access import Access
from balancer.http.route_table import http_access
from common.rpc import bearer

log = structlog.get_logger(__name__)
Endpoint = Callable[[Request], Awaitable[Response]]


def _guarded(keys: KeyRing, access: Access | None, what: str, endpoint: Endpoint) -> Endpoint:
    if access is not None and access.public:
        return endpoint

    async def checked(request: Request) -> Response:
        # Raises ``unauthorized`` (no, unknown or revoked key) or ``forbidden`` (wrong scope, or unlisted).
        client = request.client.host if request.client is not None else ""
        await keys.authorize(bearer(request.headers.get("authorization")), access, what, client)
        return await endpoint(request)

    checked.__name__ = getattr(endpoint, "__name__", "endpoint")
    return checked


def guard(routes: Sequence[BaseRoute], keys: KeyRing) -> list[BaseRoute]:
    """``routes`` with each endpoint behind its access rule; routes the table does not list refuse all."""
    guarded: list[BaseRoute] = []
    for route in routes:
        if not isinstance(route, Route):
            raise TypeError(f"the HTTP door serves plain routes only, got {route!r}")
        methods = sorted((route.methods or set()) - {"HEAD"})
        if len(methods) != 1:
            raise ValueError(f"route {route.path} must declare exactly one method, got {methods}")
        what = f"{methods[0]} {route.path}"
        access = http_access(methods[0], route.path)
        if access is None:
            log.error("http.route_unlisted", route=what)
        endpoint: Endpoint = route.endpoint  # type: ignore[assignment]
        guarded.append(
            Route(route.path, _guarded(keys, access, what, endpoint), methods=methods, name=route.name)
        )
    return guarded
