"""gRPC plumbing shared by both processes: error mapping on the server side and on the client side."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
import structlog

from common.errors import ERRORS, GRPC_CODE_KEY, GRPC_RETRY_AFTER_KEY, ErrorCode, LlmlbError

log = structlog.get_logger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
AUTHORIZATION = "authorization"  # the metadata key every llmlb key and node token travels in

# Messages up to 64 MiB: transcription uploads and image edits travel in one request.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: LlmlbError) -> None:
    """Ends the RPC with the error's gRPC status; its code and any retry delay go in trailing metadata."""
    trailing: tuple[tuple[str, str], ...] = ((GRPC_CODE_KEY, error.code.value),)
    wait = error.retry_after()
    if wait is not None:
        trailing += ((GRPC_RETRY_AFTER_KEY, str(wait)),)
    await context.abort(error.spec.grpc_status, error.message, trailing_metadata=trailing)


async def _fail(context: grpc.aio.ServicerContext[Any, Any], name: str, exc: Exception) -> None:
    """Ends a failed call: a client error as itself, an abort as it was, anything else as internal."""
    if isinstance(exc, LlmlbError):
        await abort_with(context, exc)
    elif isinstance(exc, grpc.aio.AbortError):
        raise exc
    else:
        log.exception("rpc.failed", rpc=name, error=repr(exc))
        await abort_with(context, LlmlbError(ErrorCode.INTERNAL, "internal error; see the server log"))


def rpc_errors(fn: F) -> F:
    """Maps ``LlmlbError`` (and anything unexpected) raised by a servicer method to a gRPC status.

    Works for unary and streaming handlers alike; clients never see a Python traceback.
    """
    name = fn.__name__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                # aclosing: however the call ends, the handler's own generator is closed at once.
                async with contextlib.aclosing(fn(self, request, context)) as items:
                    async for item in items:
                        yield item
            except Exception as exc:
                await _fail(context, name, exc)

        return cast(F, stream_wrapper)

    @functools.wraps(fn)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            await _fail(context, name, exc)

    return cast(F, unary_wrapper)


_BY_STATUS: dict[grpc.StatusCode, ErrorCode] = {}
for _code, _spec in ERRORS.items():
    _BY_STATUS.setdefault(_spec.grpc_status, _code)


def error_from_rpc(exc: grpc.aio.AioRpcError | grpc.RpcError) -> LlmlbError:
    """The ``LlmlbError`` a failed call carries, for clients of llmlb's own services."""
    trailing = getattr(exc, "trailing_metadata", None)
    metadata = cast(Sequence[tuple[str, str | bytes]], (trailing() if callable(trailing) else None) or ())
    code_value = ""
    for key, value in metadata:
        if key == GRPC_CODE_KEY:
            code_value = value if isinstance(value, str) else value.decode()
    status = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    try:
        code = ErrorCode(code_value)
    except ValueError:
        code = _BY_STATUS.get(status, ErrorCode.INTERNAL)
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return LlmlbError(code, details or status.name.lower())


def answered(exc: grpc.RpcError) -> bool:
    """Whether an llmlb service itself ended the call (its error code rides in trailing metadata)."""
    trailing = getattr(exc, "trailing_metadata", None)
    metadata = cast(Sequence[tuple[str, str | bytes]], (trailing() if callable(trailing) else None) or ())
    return any(key == GRPC_CODE_KEY for key, _ in metadata)


def unreachable(exc: grpc.RpcError) -> bool:
    """Whether a call failed without reaching a live server: nothing listens, the connection broke, or
    no answer came in time. Another address may serve the same call; an answered error would repeat."""
    status = exc.code() if hasattr(exc, "code") else None
    return status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not answered(exc)


def bearer(header_value: str | bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value; None when absent or another scheme."""
    if not header_value:
        return None
    text = header_value if isinstance(header_value, str) else header_value.decode(errors="replace")
    scheme, _, token = text.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def metadata_bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token of a call's ``authorization`` metadata entry, if it has one."""
    for name, value in metadata or ():
        if name == AUTHORIZATION:
            return bearer(value)
    return None


def refusing_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    status: grpc.StatusCode,
    message: str,
    trailing: Sequence[tuple[str, str]] = (),
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of ``handler``'s shape (unary or streaming either way) that ends the call at once."""

    async def fail(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status, message, trailing_metadata=tuple(trailing))

    async def fail_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await fail(request, context)
        yield  # pragma: no cover  # makes this an async generator, as streaming handlers must be

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(fail_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(fail)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(fail_stream)
    return grpc.unary_unary_rpc_method_handler(fail)
