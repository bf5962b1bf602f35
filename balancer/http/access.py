"""Who may call: the bearer key of an HTTP request checked against the scope a route needs."""

from __future__ import annotations

from starlette.requests import Request

from balancer.auth import KeyRing
from common.rpc import bearer
from common.types import Scope


async def authorize(keys: KeyRing, request: Request, scope: Scope) -> None:
    """Raises ``unauthorized`` (no, unknown or revoked key) or ``forbidden`` (key lacks ``scope``)."""
    if keys.enabled:
        await keys.check(bearer(request.headers.get("authorization")), scope)
