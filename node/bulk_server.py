"""The node's bulk data door: model file bytes over HTTP/1.1 range requests, kernel to kernel.

The protocol is ``common/bulk_http.py``'s. A caller must present a token the node's gRPC door
accepts (the fleet token or ``XLLM_AUTH_TOKEN``); the bytes are sent with ``loop.sendfile``, so they
go from the page cache to the socket without passing through Python.

Peers find the port through ``Manifest.GetBulkEndpoint`` on the node's gRPC door; a node without
this server (an older one) answers that call UNIMPLEMENTED and is read with ``ReadBlob`` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import structlog

from common.bulk_http import (
    BlobRequest,
    BulkListener,
    covers,
    parse_range,
    range_head,
    send_json,
    serve_connection,
)
from common.config import DEFAULT_HTTP_LIMITS, HttpLimits
from common.errors import ErrorCode, LlmlbError
from common.model_id import normalize_model_id
from common.secret import Secret
from common.types import ManifestFile
from node.token_auth import NodeCredentials

log = structlog.get_logger(__name__)

# Where a file's bytes are: (manifest entry, path). Raises model_not_found when not held.
Locate = Callable[[str, str], Awaitable[tuple[ManifestFile, Path]]]


class PartialFile(Protocol):
    """A download in progress on this node, as peers may read it (``node/transfer.py``)."""

    @property
    def file(self) -> ManifestFile: ...

    @property
    def part(self) -> Path: ...

    def held_ranges(self) -> list[tuple[int, int]]: ...

    def fetching_ranges(self) -> list[tuple[int, int]]: ...


# The download in progress of (model id, filename), if any.
FindPartial = Callable[[str, str], PartialFile | None]


class BulkServer:
    """Serves the files ``locate`` finds to callers ``credentials`` accepts."""

    def __init__(
        self,
        locate: Locate,
        credentials: NodeCredentials,
        partial: FindPartial = lambda m, f: None,
        limits: HttpLimits = DEFAULT_HTTP_LIMITS,
    ) -> None:
        self._locate = locate
        self._credentials = credentials
        self._partial = partial
        self._listener = BulkListener(self._serve, limits)

    @property
    def port(self) -> int:
        return self._listener.port

    async def start(self, listen: str) -> int:
        """Listens on ``host:port`` (port 0: any free one) and returns the port."""
        return await self._listener.start(listen, "node.bulk_listening")

    async def stop(self) -> None:
        await self._listener.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_connection(reader, writer, self._authorize, self._send, "node", self._listener.limits)

    async def _authorize(self, token: Secret | None) -> None:
        if not self._credentials.accepts(token.reveal() if token is not None else None):
            raise LlmlbError(ErrorCode.UNAUTHORIZED, "send 'Authorization: Bearer <fleet token>'")

    async def _send(self, request: BlobRequest, writer: asyncio.StreamWriter) -> None:
        partial: PartialFile | None = None
        try:
            file, path = await self._locate(request.model_id, request.filename)
        except LlmlbError as exc:
            partial = self._partial(normalize_model_id(request.model_id), request.filename)
            if exc.code is not ErrorCode.MODEL_NOT_FOUND or partial is None:
                raise
            file, path = partial.file, partial.part
        if request.path == "/pieces":
            held = [(0, file.size_bytes)] if partial is None else partial.held_ranges()
            fetching = [] if partial is None else partial.fetching_ranges()
            await send_json(writer, {"size": file.size_bytes, "held": held, "fetching": fetching})
            return
        start, end = parse_range(request.range_header, file.size_bytes)
        if partial is not None and not covers(partial.held_ranges(), start, end):
            # A peer asked ahead of this node's own download: not an error of either, try later.
            raise LlmlbError(ErrorCode.UNAVAILABLE, f"bytes {start}-{end - 1} are not held yet")
        with path.open("rb") as fh:  # opened before the head goes out: a vanished file is a clean 404
            writer.write(range_head(start, end, file.size_bytes, file.sha256))
            await writer.drain()
            if end == start:
                return  # a 0-byte file: the head says it all (sendfile refuses a count of 0)
            # os.sendfile under the hood: page cache to socket, no copy through Python.
            sent = await asyncio.get_running_loop().sendfile(writer.transport, fh, start, end - start)
        if sent != end - start:
            raise ConnectionError(f"{path.name} ended after {sent} of {end - start} bytes")
