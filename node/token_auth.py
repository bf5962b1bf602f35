"""The node's own gRPC door: ``Inference`` and ``Manifest`` serve only callers the fleet vouches for.

A caller is let in when it presents, as ``authorization: Bearer <token>``, either the **fleet token**
the balancer handed this node in ``RegisterNode`` (the balancer presents it on routed calls, peers
present it when they fetch blobs) or this node's own ``XLLM_AUTH_TOKEN`` when the operator set one.
Until the node has registered it knows no fleet token, so it refuses everything but its own token:
the door fails closed. Health checks and reflection stay open, for probes.

Both tokens live in memory only: never logged, never written to disk.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import structlog

from common.errors import GRPC_CODE_KEY, ErrorCode
from common.rpc import OpenReads, metadata_bearer, refusing_handler
from common.secret import Secret

log = structlog.get_logger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MISSING = (
    "this node serves only its balancer, its peers and callers with its token: "
    "send 'authorization: Bearer <XLLM_AUTH_TOKEN>'"
)
WRONG = "the token presented does not match this fleet's token or this node's XLLM_AUTH_TOKEN"


class NodeCredentials:
    """The tokens this node accepts, and the one it presents to its peers.

    ``own`` is ``XLLM_AUTH_TOKEN`` (empty when unset); ``fleet`` is set by each registration with the
    balancer. Neither is ever shown: the ``repr`` says only which are known.
    """

    def __init__(self, own: Secret | None = None) -> None:
        self._own = own if own is not None else Secret()
        self._fleet = Secret()

    @property
    def has_fleet_token(self) -> bool:
        return bool(self._fleet)

    def set_fleet_token(self, token: str) -> None:
        """The fleet token from the latest registration; an empty one (an older balancer) keeps the last."""
        if token:
            self._fleet = Secret(token)

    def accepts(self, presented: str | None) -> bool:
        """Whether ``presented`` is the fleet token or this node's own, each compared in constant time."""
        fleet = self._fleet.matches(presented)
        own = self._own.matches(presented)
        return fleet or own

    def for_peers(self) -> str:
        """What this node presents to a peer: the fleet token, which every registered node accepts.

        A node that never registers (``xllm pull``) asks the balancer for the fleet token before its
        first peer fetch; until it has one, it presents its own ``XLLM_AUTH_TOKEN``.
        """
        return (self._fleet or self._own).reveal()

    def __repr__(self) -> str:
        own = "set" if self._own else "unset"
        fleet = "known" if self._fleet else "unknown"
        return f"NodeCredentials(own={own}, fleet={fleet})"


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses every call but health and reflection unless it presents a token ``credentials`` accepts."""

    def __init__(self, credentials: NodeCredentials) -> None:
        self._credentials = credentials
        self._open_reads = OpenReads()  # what callers without a token may make the node hold

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if method.startswith(OPEN_SERVICES):
            return self._open_reads.guard(handler)
        presented = metadata_bearer(handler_call_details.invocation_metadata)
        if self._credentials.accepts(presented):
            return handler
        reason = "missing" if presented is None else "wrong"
        log.info(  # never a token itself
            "node.auth_refused",
            method=method,
            reason=reason,
            registered=self._credentials.has_fleet_token,
        )
        # The balancer's router reads an ``unauthorized`` refusal from a node as that node's fault
        # (retried elsewhere, else 503): the client's own key was already checked at the balancer.
        return refusing_handler(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            MISSING if presented is None else WRONG,
            ((GRPC_CODE_KEY, ErrorCode.UNAUTHORIZED.value),),
        )


def server_interceptors(credentials: NodeCredentials) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """The node server's interceptors: the token check, always."""
    return [TokenInterceptor(credentials)]
