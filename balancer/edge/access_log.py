"""The access log (``LLMLB_ACCESS_LOG=on``): one structured line per request, the same on both doors.

A ``Sink`` of the edge's observer, so a request is logged where its metrics are counted, once, when it
ends, whichever door it came through. The line names the caller's key by its id, never its secret, and
is written through the process's logging (``common.logs``: console or JSON, masked), at level info.
"""

from __future__ import annotations

import structlog

from balancer.edge.observe import OK, ObservedCall
from common.errors import ERRORS, ErrorCode

log = structlog.get_logger("llmlb.access")


def status(door: str, code: str) -> str:
    """What the door answered: the HTTP status (``200``) or the gRPC status name (``NOT_FOUND``)."""
    spec = None if code == OK else ERRORS.get(ErrorCode(code))
    if door == "http":
        return str(spec.http_status if spec is not None else 200)
    return spec.grpc_status.name if spec is not None else "OK"


class AccessLog:
    """Writes one ``access`` event per finished request."""

    def finished(self, call: ObservedCall, code: str, elapsed_s: float) -> None:
        log.info(
            "access",
            door=call.door,
            method=call.method or None,
            route=call.route,
            model=call.model or None,
            key_id=call.key_id or None,
            code=code,
            status=status(call.door, code),
            duration_ms=round(elapsed_s * 1000, 1),
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            node=call.node_id or None,
        )
