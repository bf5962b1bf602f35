"""ASGI middleware refusing request bodies over the configured size: by Content-Length, and by counting."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from balancer.http.errors import error_response
from common.errors import ErrorCode, LlmlbError


def too_large(limit: int) -> LlmlbError:
    return LlmlbError(
        ErrorCode.PAYLOAD_TOO_LARGE, f"request body is over the {limit // (1024 * 1024)} MiB limit"
    )


class BodyLimit:
    """413 ``payload_too_large`` for a declared length over ``limit``; a longer chunked body fails."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > self.limit:
                    await error_response(too_large(self.limit))(scope, receive, send)
                    return
                break
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large(self.limit)  # surfaces from request.body() / form() in the handler
            return message

        await self.app(scope, counted, send)
