"""The bulk path's ranges: what a caller gets for a bad ``Range`` header and for a 0-byte file.

The parser alone, then a node's bulk server over a real socket: every answer is an HTTP status with
the house error body (or the empty file), on a connection that stays usable, never a dropped one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from common.bulk_http import parse_range
from common.errors import ErrorCode, LlmlbError
from common.types import FileFormat, ManifestFile
from node.bulk_server import BulkServer
from node.token_auth import NodeCredentials

TOKEN = "fleet-secret-for-ranges"
HUGE = "9" * 5000  # past Python's 4300-digit limit for int()


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("", 10, (0, 10)),
        ("bytes=0-", 10, (0, 10)),
        ("bytes=2-4", 10, (2, 5)),
        ("bytes=9-", 10, (9, 10)),
        ("bytes=3-999", 10, (3, 10)),  # an end past the file is cut to it
        ("", 0, (0, 0)),  # a 0-byte file: an empty range, not an error
        ("bytes=0-", 0, (0, 0)),
    ],
)
def test_a_good_range_reads_as_start_and_end(header: str, size: int, expected: tuple[int, int]) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header", [f"bytes=0-{HUGE}", f"bytes={HUGE}-", "bytes=5-3", "bytes=0-1,4-5", "items=0-1", "bytes=-5"]
)
def test_a_malformed_range_is_an_invalid_request_with_a_short_message(header: str) -> None:
    with pytest.raises(LlmlbError) as refused:
        parse_range(header, 10)
    assert refused.value.code is ErrorCode.INVALID_REQUEST
    assert "past the end" not in refused.value.message  # a 400, not a 416
    assert len(refused.value.message) < 200


def test_a_range_starting_past_the_end_says_so() -> None:
    with pytest.raises(LlmlbError) as refused:
        parse_range("bytes=10-", 10)
    assert refused.value.code is ErrorCode.INVALID_REQUEST and "past the end" in refused.value.message


async def _serve(tmp_path: Path, data: bytes) -> tuple[BulkServer, ManifestFile]:
    f = ManifestFile("w.gguf", FileFormat.GGUF, len(data), hashlib.sha256(data).hexdigest())
    path = tmp_path / "w.gguf"
    path.write_bytes(data)
    credentials = NodeCredentials()
    credentials.set_fleet_token(TOKEN)

    async def locate(model_id: str, filename: str) -> tuple[ManifestFile, Path]:
        return f, path

    server = BulkServer(locate, credentials)
    await server.start("127.0.0.1:0")
    return server, f


async def _ask(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, range_header: str | None
) -> tuple[int, dict[str, str], bytes]:
    """One keep-alive request on an open connection: status, headers, body."""
    lines = ["GET /blob?model=acme/m&file=w.gguf HTTP/1.1", "Host: x", f"Authorization: Bearer {TOKEN}"]
    if range_header is not None:
        lines.append(f"Range: {range_header}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    async with asyncio.timeout(5):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split()[1])
        headers = {}
        for line in head.split("\r\n")[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def test_a_huge_range_number_is_a_400_and_the_connection_goes_on(tmp_path: Path) -> None:
    server, _ = await _serve(tmp_path, b"0123456789")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        status, _, body = await _ask(reader, writer, f"bytes=0-{HUGE}")
        assert status == 400
        assert json.loads(body)["error"]["code"] == "invalid_request"
        status, _, body = await _ask(reader, writer, "bytes=10-")
        assert status == 416
        status, _, body = await _ask(reader, writer, "bytes=2-4")  # the same connection still serves
        assert (status, body) == (206, b"234")
    finally:
        writer.close()
        await server.stop()


async def test_a_zero_byte_file_is_a_200_with_an_empty_body(tmp_path: Path) -> None:
    server, f = await _serve(tmp_path, b"")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for range_header in (None, "bytes=0-"):
            status, headers, body = await _ask(reader, writer, range_header)
            assert (status, headers["content-length"], body) == (200, "0", b"")
            assert headers["x-sha256"] == f.sha256
    finally:
        writer.close()
        await server.stop()
