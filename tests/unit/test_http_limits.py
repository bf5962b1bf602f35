"""The head rules of the hand-written HTTP/1.1 ports (bulk, node metrics), on a stream fed by hand."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from common.config import HttpLimits
from common.http_limits import HeadTooLarge, error_bytes, headers_too_large, read_head

pytestmark = pytest.mark.timeout(10)
LIMITS = HttpLimits(max_header_bytes=1024, header_timeout_s=0.3, keepalive_timeout_s=0.1, max_connections=4)


def stream(data: bytes = b"") -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=LIMITS.max_header_bytes)
    reader.feed_data(data)
    return reader


async def test_a_head_within_the_limit_is_read_through_its_blank_line() -> None:
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    assert await read_head(stream(head + b"next"), LIMITS, fresh=True) == head


async def test_a_head_over_the_limit_is_refused_without_waiting_for_its_end() -> None:
    with pytest.raises(HeadTooLarge):
        await read_head(stream(b"GET / HTTP/1.1\r\nX: " + b"a" * 4096), LIMITS, fresh=True)
    with pytest.raises(HeadTooLarge):  # ended, but past the limit
        await read_head(stream(b"GET / HTTP/1.1\r\nX: " + b"a" * 1100 + b"\r\n\r\n"), LIMITS, fresh=True)


async def test_a_head_that_stops_halfway_ends_at_the_header_timeout_from_the_connection() -> None:
    started = time.monotonic()
    assert await read_head(stream(b"GET / HTTP/1.1\r\nHost"), LIMITS, fresh=True) is None
    assert LIMITS.header_timeout_s <= time.monotonic() - started < LIMITS.header_timeout_s + 0.5


async def test_a_silent_kept_alive_connection_ends_at_the_keepalive_timeout() -> None:
    started = time.monotonic()
    assert await read_head(stream(), LIMITS, fresh=False) is None
    assert LIMITS.keepalive_timeout_s <= time.monotonic() - started < LIMITS.header_timeout_s


async def test_a_closed_connection_ends_without_a_head() -> None:
    reader = stream()
    reader.feed_eof()
    assert await read_head(reader, LIMITS, fresh=True) is None


def test_the_431_is_the_house_error_and_closes_the_connection() -> None:
    head, _, body = error_bytes(headers_too_large(64 * 1024)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == "headers_too_large"
    assert "64 KiB" in json.loads(body)["error"]["message"]
