"""What the router makes of a failed node call: retry elsewhere, and whether the node is to blame."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from balancer.router.failover import classify
from common.errors import GRPC_CODE_KEY, ErrorCode


def node_error(code: ErrorCode, status: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """The error a node's own handler ends a call with: its llmlb code rides in the trailing metadata."""
    trailing = grpc.aio.Metadata((GRPC_CODE_KEY, code.value))
    return grpc.aio.AioRpcError(
        status, grpc.aio.Metadata(), trailing, details="from the node", debug_error_string=""
    )


def transport_error(status: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """An error no handler of the node wrote: a refused connection, a deadline, a cancel."""
    return grpc.aio.AioRpcError(
        status, grpc.aio.Metadata(), grpc.aio.Metadata(), details="transport", debug_error_string=""
    )


@pytest.mark.parametrize(
    ("exc", "code", "retry", "node_fault"),
    [
        (transport_error(grpc.StatusCode.UNAVAILABLE), ErrorCode.NO_CAPABLE_NODES, True, True),
        (transport_error(grpc.StatusCode.UNKNOWN), ErrorCode.NO_CAPABLE_NODES, True, True),
        (transport_error(grpc.StatusCode.DEADLINE_EXCEEDED), ErrorCode.TIMEOUT, False, False),
        (transport_error(grpc.StatusCode.CANCELLED), ErrorCode.CANCELLED, False, False),
        (node_error(ErrorCode.INTERNAL, grpc.StatusCode.INTERNAL), ErrorCode.INTERNAL, True, True),
        (
            node_error(ErrorCode.QUEUE_FULL, grpc.StatusCode.RESOURCE_EXHAUSTED),
            ErrorCode.QUEUE_FULL,
            True,
            False,
        ),
        (
            node_error(ErrorCode.NO_CAPABLE_NODES, grpc.StatusCode.UNAVAILABLE),
            ErrorCode.NO_CAPABLE_NODES,
            True,
            True,
        ),
        (
            node_error(ErrorCode.DOWNLOAD_FAILED, grpc.StatusCode.UNAVAILABLE),
            ErrorCode.DOWNLOAD_FAILED,
            True,
            True,
        ),
        (
            node_error(ErrorCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
            ErrorCode.UNAVAILABLE,
            True,
            True,
        ),
        (
            node_error(ErrorCode.INVALID_REQUEST, grpc.StatusCode.INVALID_ARGUMENT),
            ErrorCode.INVALID_REQUEST,
            False,
            False,
        ),
        (
            node_error(ErrorCode.MODEL_NOT_FOUND, grpc.StatusCode.NOT_FOUND),
            ErrorCode.MODEL_NOT_FOUND,
            False,
            False,
        ),
    ],
)
def test_failed_node_calls_are_classified(
    exc: grpc.aio.AioRpcError, code: ErrorCode, retry: bool, node_fault: bool
):
    failure = classify(exc)

    assert (failure.error.code, failure.retry, failure.node_fault) == (code, retry, node_fault)


def test_a_full_node_tells_the_caller_when_to_come_back():
    failure = classify(node_error(ErrorCode.QUEUE_FULL, grpc.StatusCode.RESOURCE_EXHAUSTED))

    assert failure.error.retry_after_s == 1.0


def test_a_node_gone_says_so_with_grpcs_details():
    failure = classify(transport_error(grpc.StatusCode.UNAVAILABLE))

    assert failure.error.message == "node failed: transport"
