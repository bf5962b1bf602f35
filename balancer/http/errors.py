"""Every HTTP failure in OpenAI's shape ``{"error": {"message", "type", "code", "param"}}``.

Exception handlers for ``LlmlbError`` and Starlette's routing errors (404, 405), and a last-resort
middleware that turns anything unexpected into a 500 with no traceback in the body.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from balancer.http.openai_answers import dumps
from common.errors import ErrorCode, LlmlbError

log = structlog.get_logger(__name__)


def retry_after(error: LlmlbError) -> str | None:
    """``Retry-After``'s value (``LlmlbError.retry_after``): on a 429, or when the error names a wait."""
    seconds = error.retry_after()
    return None if seconds is None else str(seconds)


def error_response(
    error: LlmlbError, *, status: int | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    """The JSON response for ``error``; ``status`` overrides the table's only for routing errors."""
    headers = {**dict(error.headers), **(headers or {})}
    wait = retry_after(error)
    if wait is not None:
        headers["retry-after"] = wait
    return Response(
        dumps(error.to_openai()),
        status_code=status or error.spec.http_status,
        media_type="application/json",
        headers=headers,
    )


async def _llmlb_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LlmlbError)
    if exc.spec.http_status >= 500:
        log.warning("http.error", path=request.url.path, code=exc.code.value, error=exc.message)
    return error_response(exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    method, path = request.method, request.url.path
    if exc.status_code == 404:
        message = f"Invalid URL ({method} {path})"
    elif exc.status_code == 405:
        message = f"method {method} is not allowed on {path}"
    else:
        message = str(exc.detail)
    # Routing errors have no row of their own: invalid_request, with the status HTTP gives them.
    return error_response(
        LlmlbError(ErrorCode.INVALID_REQUEST, message), status=exc.status_code, headers=exc.headers
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = f"invalid value for {where!r}: {first.get('msg', 'invalid')}"
    return error_response(LlmlbError(ErrorCode.INVALID_REQUEST, message))


def install_error_handlers(app: FastAPI) -> None:
    """Routes ``LlmlbError``, 404/405 and FastAPI's own validation errors to OpenAI-shaped bodies."""
    app.add_exception_handler(LlmlbError, _llmlb_error)
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)


class Unexpected:
    """ASGI middleware: an exception nobody handled is logged and answered with a bare 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.exception("http.failed", method=scope.get("method"), path=scope.get("path"), error=repr(exc))
            if not started:
                internal = LlmlbError(ErrorCode.INTERNAL, "internal error; see the server log")
                await error_response(internal)(scope, receive, send)
