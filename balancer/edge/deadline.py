"""A request's deadline, as each door receives it: the time the caller will wait for its answer.

The gRPC door has the caller's ``grpc-timeout`` (``context.time_remaining()``); the HTTP door reads
``X-Request-Timeout``, in seconds (OpenAI's clients send none by default: their ``timeout`` stays on
the client). Both become the ``timeout`` the router is called with: it sheds a request that could not
be answered within it, starts no node call once it has passed, and hands the rest to the node as the
call's gRPC deadline. Without one, the router's ``LLMLB_REQUEST_TIMEOUT`` applies, and the queue's
own limits (``LLMLB_MAX_QUEUE_WAIT``, ``LLMLB_QUEUE_TIMEOUT``) bound the wait.
"""

from __future__ import annotations

import math

from common.errors import ErrorCode, LlmlbError

REQUEST_TIMEOUT_HEADER = "x-request-timeout"
MAX_REQUEST_TIMEOUT_S = 86_400.0  # a day: longer is no deadline, and would overflow gRPC's


def header_timeout(raw: str | None) -> float | None:
    """The seconds an ``X-Request-Timeout`` value gives; None when absent, ``invalid_request`` if bad."""
    if raw is None or not raw.strip():
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_REQUEST_TIMEOUT_S:  # also refuses nan and infinity
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST,
            f"{REQUEST_TIMEOUT_HEADER} must be a number of seconds above 0 and at most "
            f"{MAX_REQUEST_TIMEOUT_S:.0f}; got {raw[:40]!r}",
        )
    return seconds


def time_left(remaining: float | None) -> float | None:
    """The router's ``timeout`` from a gRPC call's ``time_remaining()``: 0 once it has passed."""
    return None if remaining is None else max(0.0, remaining)
