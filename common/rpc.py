"""gRPC plumbing shared by both processes: error mapping on the server side and on the client side."""

from __future__ import annotations

import asyncio
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
# A request carries its upload beside a few fields (model, prompt, options): room for those.
MESSAGE_OVERHEAD_BYTES = 1024 * 1024
STREAM_WINDOW_BYTES = 64 * 1024  # what a stream may send before the server reads it
MAX_STREAMS_PER_CONNECTION = 256  # calls at once on one connection; a client's further calls wait
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def max_request_bytes(max_body_mb: int) -> int:
    """The largest gRPC request a server takes: the HTTP body limit (``LLMLB_MAX_BODY_MB``) and room
    for the fields beside the upload, so both doors take the same uploads."""
    return max_body_mb * 1024 * 1024 + MESSAGE_OVERHEAD_BYTES


def server_options(max_body_mb: int) -> list[tuple[str, Any]]:
    """A gRPC server's options, its receive limit derived from the body limit.

    gRPC takes in a stream's data before the application has even seen the call (so before any key
    is checked), as far as the stream's flow-control window allows; with window growth by bandwidth
    probing that is whole messages. A fixed 64 KiB window per stream, and a cap on streams per
    connection, bound what a call the server has not read yet can make it hold; a message the
    server reads opens its window to the message's size.
    """
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", max_request_bytes(max_body_mb)),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


SERVER_OPTIONS = server_options(MAX_MESSAGE_BYTES // (1024 * 1024))  # servers outside the product


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: LlmlbError) -> None:
    """Ends the RPC with the error's gRPC status; its code and any retry delay go in trailing metadata."""
    trailing: tuple[tuple[str, str], ...] = ((GRPC_CODE_KEY, error.code.value), *error.headers)
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
    """A handler that ends the call at once, before its request is read.

    It takes the request as a stream whatever ``handler`` takes: gRPC reads a unary request whole
    before it runs the handler, so a refused caller could make the server hold up to the message
    limit; a streaming handler that never reads leaves the message unread. The response keeps
    ``handler``'s shape.
    """

    async def fail(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status, message, trailing_metadata=tuple(trailing))

    async def fail_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await fail(request, context)
        yield  # pragma: no cover  # makes this an async generator, as streaming handlers must be

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(fail_stream)
    return grpc.stream_unary_rpc_method_handler(fail)


# Open methods (health checks, reflection) serve callers without a key. gRPC takes in a call's request
# whole, up to the message limit, whether or not the handler has asked for it yet; only a call that
# ends stops it. So open calls are let in one at a time (one more is refused at once, which costs
# nothing): a health check holds its place only while its request arrives, within a second; a
# reflection stream holds its own for its whole length. What callers without a key can make a server
# hold is then one request per kind, not one per call.
OPEN_READ_TIMEOUT_S = 1.0  # a health check's request is a few bytes: it arrives at once or never


class OpenReads:
    """Lets open calls in one at a time per kind, refusing one more at once: ``guard`` each handler."""

    def __init__(self) -> None:
        self._busy: set[bool] = set()  # the kinds (request streaming or not) with a call being let in

    @contextlib.asynccontextmanager
    async def _place(
        self, streaming: bool, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        if streaming in self._busy:
            await abort_with(
                context, LlmlbError(ErrorCode.QUEUE_FULL, "another open call is being read; retry")
            )
        self._busy.add(streaming)
        try:
            yield
        finally:
            self._busy.discard(streaming)

    async def _first(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """The call's one request, read while it holds the place."""
        async with self._place(False, context):
            try:
                async with asyncio.timeout(OPEN_READ_TIMEOUT_S):
                    request = await anext(requests, None)
            except TimeoutError:
                await abort_with(context, LlmlbError(ErrorCode.TIMEOUT, "the request did not arrive in time"))
        if request is None:
            await abort_with(context, LlmlbError(ErrorCode.INVALID_REQUEST, "no request message"))
        return request

    def guard(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` taking its request as a stream, let in through ``OpenReads``; same response shape."""

        async def result(requests: AsyncIterator[Any], context: Any) -> Any:
            """What the wrapped behaviour gives: a response, a coroutine or an async generator."""
            if handler.request_streaming:
                behaviour = cast(Callable[..., Any], handler.stream_stream or handler.stream_unary)
                return behaviour(requests, context)
            behaviour = cast(Callable[..., Any], handler.unary_stream or handler.unary_unary)
            return behaviour(await self._first(requests, context), context)

        async def unary(requests: AsyncIterator[Any], context: Any) -> Any:
            async with self._place(True, context) if handler.request_streaming else contextlib.nullcontext():
                answer = await result(requests, context)
                return await answer if inspect.isawaitable(answer) else answer

        async def streaming(requests: AsyncIterator[Any], context: Any) -> None:
            async with self._place(True, context) if handler.request_streaming else contextlib.nullcontext():
                answer = await result(requests, context)
                if inspect.isasyncgen(answer):
                    async for item in answer:
                        await context.write(item)
                elif inspect.isawaitable(answer):
                    await answer  # a handler that writes its responses itself (health's Watch)

        shapes = {"request_deserializer": handler.request_deserializer}
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                streaming, **shapes, response_serializer=handler.response_serializer
            )
        return grpc.stream_unary_rpc_method_handler(
            unary, **shapes, response_serializer=handler.response_serializer
        )
