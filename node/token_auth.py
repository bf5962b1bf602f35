"""The node's own gRPC door: ``Inference`` and ``Manifest`` serve only callers the fleet vouches for.

A caller is let in when it presents, as ``authorization: Bearer <token>``, either a **fleet token**
the balancer handed this node (the balancer presents one on routed calls, peers present one when they
fetch blobs) or this node's own ``XLLM_AUTH_TOKEN`` when the operator set one. Fleet tokens expire:
each comes with how long to accept it, and the balancer sends new ones over the node's session before
the old ones run out, or at once, replacing them all, when a revocation rotated them. Until the node
has registered it knows no fleet token, so it refuses everything but its own token: the door fails
closed. Health checks and reflection stay open, for probes.

Both tokens live in memory only: never logged, never written to disk.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
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

    ``own`` is ``XLLM_AUTH_TOKEN`` (empty when unset); the fleet tokens come from the balancer, each
    accepted until its time runs out. None is ever shown: the ``repr`` says only which are known.
    ``clock`` (monotonic seconds) is injected where a test needs tokens to expire.
    """

    def __init__(self, own: Secret | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._own = own if own is not None else Secret()
        self._clock = clock
        self._fleet: dict[str, float] = {}  # accepted fleet token -> when to forget it
        self._present = ""  # the fleet token to present to peers

    def _live(self) -> dict[str, float]:
        now = self._clock()
        expired = [t for t, until in self._fleet.items() if until <= now]
        for token in expired:
            del self._fleet[token]
        return self._fleet

    @property
    def has_fleet_token(self) -> bool:
        return self._present in self._live()

    def set_fleet_tokens(
        self, present: str, accepted: Iterable[tuple[str, float]], *, replaces: bool
    ) -> None:
        """The fleet tokens the balancer sent: ``present`` to show peers, each accepted one for its
        seconds from now; ``replaces`` forgets every token accepted before (a rotation)."""
        now = self._clock()
        if replaces:
            self._fleet.clear()
        for token, valid_s in accepted:
            if token and valid_s > 0:
                self._fleet[token] = max(self._fleet.get(token, 0.0), now + valid_s)
        if present in self._fleet:
            self._present = present

    def set_fleet_token(self, token: str) -> None:
        """A fleet token from a balancer that sends no lifetime (an older one): kept until replaced.

        An empty one keeps the last.
        """
        if token:
            self.set_fleet_tokens(token, ((token, float("inf")),), replaces=True)

    def accepts(self, presented: str | None) -> bool:
        """Whether ``presented`` is a live fleet token or this node's own, compared in constant time."""
        ok = self._own.matches(presented)
        for token in self._live():
            ok |= Secret(token).matches(presented)
        return ok

    def for_peers(self) -> str:
        """What this node presents to a peer: the fleet token, which every registered node accepts.

        A node that never registers (``xllm pull``) asks the balancer for the fleet token before its
        first peer fetch (and again once it expired); until then it presents its own ``XLLM_AUTH_TOKEN``.
        """
        return self._present if self.has_fleet_token else self._own.reveal()

    def __repr__(self) -> str:
        own = "set" if self._own else "unset"
        fleet = "known" if self.has_fleet_token else "unknown"
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
