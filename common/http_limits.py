"""The transport limits of the hand-written HTTP/1.1 ports (the bulk ports): head size and time, idle
keep-alive, open connections. ``common/http_protocol.py`` applies the same ``HttpLimits`` to uvicorn's.

Each applies before a request is parsed or authorized: what a caller without a key can make a port hold
is at most ``max_connections`` heads of ``max_header_bytes``, each for at most ``header_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable

import structlog

from common.config import HttpLimits
from common.errors import ERRORS, ErrorCode, LlmlbError

log = structlog.get_logger(__name__)

# After a 431, how long the rest of an oversized head is read and dropped before the connection closes.
LINGER_S = 1.0
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class HeadTooLarge(Exception):
    """The request line and headers went past ``HttpLimits.max_header_bytes``."""


def headers_too_large(limit: int) -> LlmlbError:
    return LlmlbError(ErrorCode.HEADERS_TOO_LARGE, f"request headers are over the {limit // 1024} KiB limit")


def error_bytes(error: LlmlbError) -> bytes:
    """A whole ``Connection: close`` response carrying the house JSON error, for a door about to close."""
    body = json.dumps(error.to_openai()).encode()
    status = ERRORS[error.code].http_status
    head = (
        f"HTTP/1.1 {status} Error\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def read_head(reader: asyncio.StreamReader, limits: HttpLimits, *, fresh: bool) -> bytes | None:
    """The next request's head (through the blank line), or None when the caller closed or took too long.

    A ``fresh`` connection has ``header_timeout_s`` from its start; a kept-alive one may stay silent
    for ``keepalive_timeout_s``, then has ``header_timeout_s`` from its first byte. The reader must have
    been made with ``limit=limits.max_header_bytes`` (``start_server``), so a longer head is never buffered
    whole: it raises ``HeadTooLarge``.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(limits.header_timeout_s if fresh else limits.keepalive_timeout_s):
            first = await reader.read(1)
        if not first:
            return None
        async with asyncio.timeout_at((started if fresh else loop.time()) + limits.header_timeout_s):
            rest = await reader.readuntil(b"\r\n\r\n")
    except (TimeoutError, asyncio.IncompleteReadError):
        return None
    except asyncio.LimitOverrunError:
        raise HeadTooLarge from None
    head = first + rest
    if len(head) > limits.max_header_bytes:
        raise HeadTooLarge
    return head


async def refuse_head(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: HttpLimits, door: str
) -> None:
    """Answers 431 to a head over the limit, then lingers briefly; the caller closes the connection.

    The caller may still be sending its head: closing with those bytes unread would reset the
    connection and could drop the 431 before the caller reads it, so they are read and dropped for up
    to ``LINGER_S`` first.
    """
    log.info(f"{door}_headers_too_large", limit=limits.max_header_bytes)
    writer.write(error_bytes(headers_too_large(limits.max_header_bytes)))
    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
        async with asyncio.timeout(LINGER_S):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            while await reader.read(limits.max_header_bytes):
                pass


def capped(handle: Handler, limits: HttpLimits, door: str) -> Handler:
    """``handle`` for at most ``limits.max_connections`` connections at once; one more is closed at once."""
    open_now = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now
        if open_now >= limits.max_connections:
            log.warning(f"{door}_connections_full", limit=limits.max_connections)
            writer.transport.abort()
            return
        open_now += 1
        try:
            await handle(reader, writer)
        finally:
            open_now -= 1

    return serve


async def start_server(
    handle: Handler, host: str | None, port: int, limits: HttpLimits, door: str, *, shared: bool = False
) -> asyncio.Server:
    """``asyncio.start_server`` with the connection cap and a stream buffer no larger than one head;
    ``shared`` binds with SO_REUSEPORT (``llmlb serve --workers``: each worker on the host's one port)."""
    return await asyncio.start_server(
        capped(handle, limits, door), host, port, limit=limits.max_header_bytes, reuse_port=shared or None
    )
