"""The HTTP door's connection rules (``common/http_protocol.py``), on a transport that records what is
written: no socket, the bytes fed by hand in the reads a socket would give."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from common.config import HttpLimits
from common.http_protocol import limited_protocol
from tests.fixtures.eventually import eventually_async

pytestmark = pytest.mark.timeout(10)
LIMITS = HttpLimits(max_header_bytes=1024, header_timeout_s=0.2, keepalive_timeout_s=5.0, max_connections=2)
READ = 256 * 1024  # what one read of a socket gives at most


async def echo_length(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 200 with the length of the body it read whole."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.eof_written = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Door:
    """Connections to one HTTP door made of the limited protocol and ``echo_length``."""

    def __init__(self) -> None:
        self.config = Config(echo_length, lifespan="off", log_config=None)
        self.config.load()
        self.state = ServerState()
        self.protocol = limited_protocol(LIMITS)

    def connect(self) -> tuple[Any, RecordingTransport]:
        protocol = self.protocol(self.config, self.state, {})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        return protocol, transport


async def settle(transport: RecordingTransport, count: int) -> None:
    """Waits until ``count`` responses were written."""
    await eventually_async(lambda: transport.written.count(b"HTTP/1.1 ") >= count, 5, f"{count} responses")


def feed(protocol: Any, data: bytes) -> None:
    for start in range(0, len(data), READ):
        protocol.data_received(data[start : start + READ])


async def test_a_large_body_after_a_small_head_is_no_oversized_head_and_the_connection_is_kept() -> None:
    protocol, transport = Door().connect()
    body = b"b" * (3 * READ + 5000)  # its last read, 5000 bytes, ends the request
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body))
    feed(protocol, body)
    await settle(transport, 1)
    protocol.data_received(b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n")
    await settle(transport, 2)
    assert b" 431 " not in transport.written and not transport.closed
    assert transport.written.count(b"HTTP/1.1 200 OK") == 2 and str(len(body)).encode() in transport.written


async def test_a_head_over_the_limit_in_small_reads_gets_431_and_the_connection_ends() -> None:
    protocol, transport = Door().connect()
    protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: h\r\n")
    for _ in range(20):
        protocol.data_received(b"X-Flood: " + b"a" * 100 + b"\r\n")
    assert transport.written.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in transport.written
    assert transport.eof_written
    # Then closed, once the rest of the head has been read and dropped.
    await eventually_async(lambda: transport.closed, 5, "the connection closed")


async def test_a_head_over_the_limit_in_one_read_gets_431() -> None:
    protocol, transport = Door().connect()
    protocol.data_received(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 2048 + b"\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 431 ")


async def test_a_head_unfinished_at_the_header_timeout_closes_the_connection() -> None:
    started = time.monotonic()
    protocol, transport = Door().connect()
    protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost")
    await eventually_async(lambda: transport.closed, 5, "the connection closed")
    assert time.monotonic() - started >= LIMITS.header_timeout_s
    assert not transport.written


async def test_a_connection_past_the_cap_is_closed_as_it_is_made() -> None:
    door = Door()
    kept = [door.connect() for _ in range(LIMITS.max_connections)]
    _, refused = door.connect()
    assert refused.closed and not any(transport.closed for _, transport in kept)
