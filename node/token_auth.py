"""The node's own gRPC door: with ``XLLM_AUTH_TOKEN`` set, every call must present that token.

The balancer learns the token from ``RegisterNode`` and presents it on each routed call; peers present
their own ``XLLM_AUTH_TOKEN`` when they fetch blobs, so every node of a fleet gets the same token.
Health checks and reflection stay open, for probes. Unset: the port is open, as on a private network.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import structlog

from common.rpc import metadata_bearer, refusing_handler

log = structlog.get_logger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MISSING = "this node requires its token: send 'authorization: Bearer <XLLM_AUTH_TOKEN>'"
WRONG = "the token presented does not match this node's XLLM_AUTH_TOKEN"


def token_matches(presented: str | None, expected: str) -> bool:
    """Whether ``presented`` is ``expected``, compared in constant time."""
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses every call but health and reflection unless it presents the node's token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("TokenInterceptor needs a token; an unset XLLM_AUTH_TOKEN installs none")
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        presented = metadata_bearer(handler_call_details.invocation_metadata)
        if token_matches(presented, self._token):
            return handler
        reason = "missing" if presented is None else "wrong"
        log.info("node.auth_refused", method=method, reason=reason)  # never the token itself
        # No llmlb error code in the trailers: to the balancer's router a refusal is the node's fault
        # (retried on another node, answered 503), not the client's missing key (401).
        return refusing_handler(
            handler, grpc.StatusCode.UNAUTHENTICATED, MISSING if presented is None else WRONG
        )


def server_interceptors(token: str) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """The node server's interceptors: the token check when ``token`` is set, else none."""
    return [TokenInterceptor(token)] if token else []
