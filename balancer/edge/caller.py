"""Who is calling: the key the access check let in, for the rest of the same request.

Set once by ``KeyRing.authorize`` on either door (the HTTP guard runs in the request's task; gRPC
runs the interceptor and the handler in one task too), and read by the edge to count usage per key
and by routes that answer differently per key (``/v0/usage``). A context variable, so it follows
the request and never leaks into another one.
"""

from __future__ import annotations

from contextvars import ContextVar

from common.types import ApiKey

_CALLER: ContextVar[ApiKey | None] = ContextVar("llmlb_caller", default=None)


def set_caller(key: ApiKey | None) -> None:
    """Records the key behind the current request (None when auth is off or the call is open)."""
    _CALLER.set(key)


def caller() -> ApiKey | None:
    """The key behind the current request, if any."""
    return _CALLER.get()
