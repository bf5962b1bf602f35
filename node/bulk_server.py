"""The node's bulk data door: model file bytes over HTTP/1.1 range requests, kernel to kernel.

``GET /blob?model=<id>&file=<name>`` with ``Range: bytes=a-b`` and ``Authorization: Bearer <token>``
(the same tokens the node's gRPC door accepts: the fleet token or ``XLLM_AUTH_TOKEN``) answers
``206`` and the bytes, sent with ``loop.sendfile`` so they go from the page cache to the socket
without passing through Python. Errors are the house JSON shape, ``{"error": {message, type, code}}``.

Peers find the port through ``Manifest.GetBulkEndpoint`` on the node's gRPC door; a node without
this server (an older one) answers that call UNIMPLEMENTED and is read with ``ReadBlob`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import structlog

from common.errors import ERRORS, ErrorCode, LlmlbError
from common.formats import read_range_end
from common.types import ManifestFile
from node.token_auth import NodeCredentials

log = structlog.get_logger(__name__)

# Where a file's bytes are: (manifest entry, path). Raises model_not_found when not held.
Locate = Callable[[str, str], Awaitable[tuple[ManifestFile, Path]]]

MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 30.0
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d+)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class BulkServer:
    """Serves the files ``locate`` finds to callers ``credentials`` accepts."""

    def __init__(self, locate: Locate, credentials: NodeCredentials) -> None:
        self._locate = locate
        self._credentials = credentials
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, listen: str) -> int:
        """Listens on ``host:port`` (port 0: any free one) and returns the port."""
        host, _, port = listen.rpartition(":")
        self._server = await asyncio.start_server(self._serve, host.strip("[]") or None, int(port))
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("node.bulk_listening", address=f"{host}:{self.port}")
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another on the connection
                try:
                    async with asyncio.timeout(HEAD_TIMEOUT_S):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                if len(head) > MAX_HEAD_BYTES:
                    return
                keep = await self._answer(head.decode("latin-1"), writer)
                if not keep:
                    return
        except (ConnectionError, OSError):
            return  # the reader went away mid-transfer: its download retries elsewhere
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, head: str, writer: asyncio.StreamWriter) -> bool:
        lines = head.split("\r\n")
        parts = lines[0].split()
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        keep = headers.get("connection", "").lower() != "close"
        try:
            if len(parts) != 3 or parts[0] != "GET":
                raise LlmlbError(ErrorCode.INVALID_REQUEST, "only GET /blob?model=&file= is served here")
            scheme, _, token = headers.get("authorization", "").partition(" ")
            presented = token.strip() if scheme.lower() == "bearer" and token.strip() else None
            if not self._credentials.accepts(presented):
                log.info("node.bulk_auth_refused", reason="missing" if presented is None else "wrong")
                raise LlmlbError(ErrorCode.UNAUTHORIZED, "send 'Authorization: Bearer <fleet token>'")
            url = urlsplit(parts[1])
            query = parse_qs(url.query)
            if url.path != "/blob" or "model" not in query or "file" not in query:
                raise LlmlbError(ErrorCode.INVALID_REQUEST, "expected GET /blob?model=<id>&file=<name>")
            file, path = await self._locate(query["model"][0], query["file"][0])
            start, end = _range(headers.get("range", ""), file.size_bytes)
        except LlmlbError as exc:
            await _send_error(writer, exc)
            return keep
        await self._send(writer, file, path, start, end)
        return keep

    async def _send(
        self, writer: asyncio.StreamWriter, file: ManifestFile, path: Path, start: int, end: int
    ) -> None:
        length = end - start
        head = (
            "HTTP/1.1 206 Partial Content\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n"
            f"Content-Range: bytes {start}-{end - 1}/{file.size_bytes}\r\n"
            f"X-Sha256: {file.sha256}\r\n"
            "\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        loop = asyncio.get_running_loop()
        with path.open("rb") as fh:
            # os.sendfile under the hood: page cache to socket, no copy through Python.
            sent = await loop.sendfile(writer.transport, fh, start, length)
        if sent != length:
            raise ConnectionError(f"{path.name} ended after {sent} of {length} bytes")


def _range(value: str, size: int) -> tuple[int, int]:
    """``[start, end)`` of a single ``bytes=a-b`` range (the whole file when absent)."""
    if not value:
        return 0, size
    match = _RANGE.match(value)
    if match is None:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, f"unsupported Range {value!r}: one bytes=a-b range")
    start = int(match.group(1))
    length = int(match.group(2)) - start + 1 if match.group(2) else 0
    if length < 0:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, f"Range {value!r} ends before it starts")
    end = read_range_end(size, start, min(length, size - start) if length else 0)
    return start, end


async def _send_error(writer: asyncio.StreamWriter, exc: LlmlbError) -> None:
    spec = ERRORS[exc.code]
    status = (
        416 if exc.code is ErrorCode.INVALID_REQUEST and "past the end" in exc.message else spec.http_status
    )
    body = json.dumps(
        {"error": {"message": exc.message, "type": spec.openai_type, "code": exc.code.value}}
    ).encode()
    head = f"HTTP/1.1 {status} Error\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()
