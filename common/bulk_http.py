"""The bulk data path's wire protocol, shared by the node's server and the balancer's proxy.

Plain HTTP/1.1, ``Authorization: Bearer <token>`` on every request, two request shapes:

- ``GET /blob?model=<id>&file=<name>`` with a single ``Range: bytes=a-b``: ``206`` with
  ``Content-Range`` and the bytes; a 0-byte file, which no range can address, is a ``200`` with an
  empty body. A header that is not one ``bytes=a-b`` (numbers of at most 19 digits) is a ``400``. A
  node still downloading the file answers ``503`` (code ``unavailable``) for bytes it does not hold
  yet.
- ``GET /pieces?model=<id>&file=<name>``: ``200`` and JSON ``{"size", "held": [[start, end], ...],
  "fetching": [[start, end], ...]}``: what a node still downloading holds and is fetching now.

Errors are the house JSON ``{"error": {message, type, code}}`` with the error table's HTTP status
(416 for a range past the end). Connections are kept alive, within ``HttpLimits``
(``common/http_limits.py``): a head over the size limit gets 431 and the connection closes.

Each door supplies what differs: who may read (``Authorize``) and how a range's bytes are sent
(``SendRange``: ``sendfile`` on a node, the origin's stream on the balancer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import structlog

from common.config import HttpLimits
from common.errors import ERRORS, ErrorCode, LlmlbError
from common.formats import read_range_end
from common.http_limits import HeadTooLarge, read_head, refuse_head, start_server
from common.secret import Secret

log = structlog.get_logger(__name__)

# At most 19 digits a number: any file's offsets fit, and int() never meets Python's 4300-digit limit.
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d{1,19})\s*-\s*(\d{0,19})\s*$", re.IGNORECASE)
_SHOWN_CHARS = 64  # of a refused header, in the error message


@dataclass(frozen=True, slots=True)
class BlobRequest:
    """One parsed request: which file, and the bearer token presented (None when absent)."""

    model_id: str
    filename: str
    range_header: str
    token: Secret | None
    path: str = "/blob"  # or "/pieces"


# Raises unauthorized/forbidden unless the token may read.
Authorize = Callable[[Secret | None], Awaitable[None]]
# Answers one authorized request on the writer (headers and body), or raises LlmlbError before any byte.
SendRange = Callable[[BlobRequest, asyncio.StreamWriter], Awaitable[None]]


def parse_range(value: str, size: int) -> tuple[int, int]:
    """``[start, end)`` of a single ``bytes=a-b`` range (the whole file when absent).

    Raises ``invalid_request``: a ``400`` for a header that is not one such range, a ``416`` (its
    message says "past the end") for one that starts past the end. A 0-byte file reads as ``(0, 0)``.
    """
    if not value:
        return 0, size
    match = _RANGE.match(value)
    shown = repr(value[:_SHOWN_CHARS]) + ("..." if len(value) > _SHOWN_CHARS else "")
    if match is None:
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST,
            f"unsupported Range {shown}: one bytes=a-b range, at most 19 digits each",
        )
    start = int(match.group(1))
    length = int(match.group(2)) - start + 1 if match.group(2) else 0
    if length < 0:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, f"Range {shown} ends before it starts")
    end = read_range_end(size, start, min(length, size - start) if length else 0)
    return start, end


def range_head(start: int, end: int, size: int, sha256: str) -> bytes:
    """The head for bytes ``[start, end)`` of a ``size``-byte file: ``206``, or ``200`` for no bytes.

    Only a 0-byte file reads as an empty range, and ``Content-Range`` cannot name a byte of it.
    """
    if start == end:
        return (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/octet-stream\r\n"
            "Content-Length: 0\r\n"
            f"X-Sha256: {sha256}\r\n"
            "\r\n"
        ).encode()
    return (
        "HTTP/1.1 206 Partial Content\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {end - start}\r\n"
        f"Content-Range: bytes {start}-{end - 1}/{size}\r\n"
        f"X-Sha256: {sha256}\r\n"
        "\r\n"
    ).encode()


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    authorize: Authorize,
    send: SendRange,
    door: str,
    limits: HttpLimits,
) -> None:
    """Answers requests on one connection until the caller closes it, asks to, or stays silent."""
    try:
        fresh = True
        while True:
            try:
                head = await read_head(reader, limits, fresh=fresh)
            except HeadTooLarge:
                await refuse_head(reader, writer, limits, f"{door}.bulk")
                return
            if head is None:
                return
            fresh = False
            request, keep = _parse(head.decode("latin-1"))
            try:
                if isinstance(request, LlmlbError):
                    raise request
                try:
                    await authorize(request.token)
                except LlmlbError:
                    log.info(
                        f"{door}.bulk_auth_refused", reason="missing" if request.token is None else "wrong"
                    )
                    raise
                await send(request, writer)
            except LlmlbError as exc:
                await send_error(writer, exc)
            if not keep:
                return
    except (ConnectionError, OSError):
        return  # the reader went away mid-transfer: its download retries elsewhere
    except Exception:
        # A fault of this server, not the caller's: logged (plain traceback, no locals) and the
        # connection closed, rather than left to asyncio's handler for unhandled callback errors.
        log.exception(f"{door}.bulk_failed")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _parse(head: str) -> tuple[BlobRequest | LlmlbError, bool]:
    lines = head.split("\r\n")
    parts = lines[0].split()
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    keep = headers.get("connection", "").lower() != "close"
    if len(parts) != 3 or parts[0] != "GET":
        return LlmlbError(ErrorCode.INVALID_REQUEST, "only GET /blob?model=&file= is served here"), keep
    url = urlsplit(parts[1])
    query = parse_qs(url.query)
    if url.path not in ("/blob", "/pieces") or "model" not in query or "file" not in query:
        return LlmlbError(ErrorCode.INVALID_REQUEST, "expected GET /blob?model=<id>&file=<name>"), keep
    scheme, _, token = headers.get("authorization", "").partition(" ")
    presented = Secret(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    request = BlobRequest(query["model"][0], query["file"][0], headers.get("range", ""), presented, url.path)
    return request, keep


def covers(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether ``[start, end)`` lies inside one of ``ranges`` (merged, half-open)."""
    return any(a <= start and end <= b for a, b in ranges)


def overlaps(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(a < end and start < b for a, b in ranges)


async def send_json(writer: asyncio.StreamWriter, body: object) -> None:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    writer.write(head.encode() + data)
    await writer.drain()


async def send_error(writer: asyncio.StreamWriter, exc: LlmlbError) -> None:
    """The house JSON error, with the error table's HTTP status (416 for a range past the end)."""
    spec = ERRORS[exc.code]
    past_end = exc.code is ErrorCode.INVALID_REQUEST and "past the end" in exc.message
    status = 416 if past_end else spec.http_status
    error = {"message": exc.message, "type": spec.openai_type, "code": exc.code.value}
    body = json.dumps({"error": error}).encode()
    head = f"HTTP/1.1 {status} Error\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()


class BulkListener:
    """The listening socket of a bulk server (a node's or the balancer's proxy): start, port, stop."""

    def __init__(
        self,
        handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        limits: HttpLimits,
    ) -> None:
        self._handle = handle
        self.limits = limits
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, listen: str, event: str, *, shared: bool = False) -> int:
        """Listens on ``host:port`` (port 0: any free one), logs ``event`` and returns the port;
        ``shared``: the port is shared with the other workers of ``llmlb serve --workers``."""
        host, _, port = listen.rpartition(":")
        door = event.removesuffix("_listening")  # node.bulk, balancer.bulk: the prefix of its log events
        self._server = await start_server(
            self._handle, host.strip("[]") or None, int(port), self.limits, door, shared=shared
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info(event, address=f"{host}:{self.port}")
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):  # connections still sending are cut at the 2 s mark
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        self.port = 0  # stopped: nothing to advertise
