"""What a failed node call means: try another node? count it against the node?

The node's own errors arrive with an llmlb error code in the trailing metadata; anything else (refused
or reset connection, an error outside the node's handlers) is the node's fault, not the request's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from common.errors import GRPC_CODE_KEY, ErrorCode, LlmlbError
from common.rpc import error_from_rpc

# Node-side errors worth another node: the node is going away, full, or broken, or cannot serve the
# model for now (its engine process is down, or it cannot read the model's manifest).
RETRY_ELSEWHERE = frozenset(
    {
        ErrorCode.NO_CAPABLE_NODES,
        ErrorCode.UNAVAILABLE,
        ErrorCode.QUEUE_FULL,
        ErrorCode.INTERNAL,
        ErrorCode.INSUFFICIENT_STORAGE,
        ErrorCode.DOWNLOAD_FAILED,
        ErrorCode.ORIGIN_UNREACHABLE,
    }
)
FULL_NODE_RETRY_AFTER_S = 1.0  # a full node frees a slot within about a generation


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed node call, classified."""

    error: LlmlbError  # what the caller gets if no other node answers
    retry: bool  # worth trying another node
    node_fault: bool  # counts toward the node's cooldown


def classify(exc: grpc.aio.AioRpcError) -> Failure:
    """What a failed node call means: the node's own error, or the node gone or broken."""
    trailing: Any = exc.trailing_metadata() or ()
    from_node = any(key == GRPC_CODE_KEY for key, _ in trailing)
    status = exc.code()
    if not from_node:
        if status is grpc.StatusCode.DEADLINE_EXCEEDED:
            return Failure(LlmlbError(ErrorCode.TIMEOUT, "the request's deadline passed"), False, False)
        if status is grpc.StatusCode.CANCELLED:
            return Failure(LlmlbError(ErrorCode.CANCELLED, "the request was cancelled"), False, False)
        # Connection refused or reset, or an error outside our handlers: the node, not the request.
        return Failure(LlmlbError(ErrorCode.NO_CAPABLE_NODES, f"node failed: {exc.details()}"), True, True)
    error = error_from_rpc(exc)
    if error.code is ErrorCode.UNAUTHORIZED:
        # The node refused the balancer's own credential (a token it no longer holds): the client's key
        # passed at this door, so this is the node's fault, not a 401 for the client.
        message = f"node refused the balancer's credential: {error.message}"
        return Failure(LlmlbError(ErrorCode.NO_CAPABLE_NODES, message), True, True)
    if error.code is ErrorCode.QUEUE_FULL and error.retry_after_s is None:
        error.retry_after_s = FULL_NODE_RETRY_AFTER_S
    retry = error.code in RETRY_ELSEWHERE
    # A full node is healthy, only busy: worth another node, but no mark against it.
    return Failure(error, retry, retry and error.code is not ErrorCode.QUEUE_FULL)
