"""The balancer's bulk proxy: origin bytes passed through to nodes over HTTP/1.1 range requests.

The protocol is ``common/bulk_http.py``'s, the same a node's bulk server speaks, so a node reads
the proxy and its peers with one client. Like ``Manifest.ReadBlob`` here, nothing is written to
the balancer's disk: each chunk from the origin goes to the caller as it arrives. A caller presents
a current fleet token (what registered nodes hold; it expires and rotates) or a ``node``-scope API
key; with keys off, anyone on the network may read, as with every other call.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from balancer.auth import KeyRing
from balancer.catalog import Catalog
from balancer.fleet.token import FleetTokens
from balancer.origin import Origin
from common.bulk_http import BlobRequest, BulkListener, parse_range, range_head, serve_connection
from common.config import DEFAULT_HTTP_LIMITS, HttpLimits
from common.errors import ErrorCode, LlmlbError
from common.secret import Secret
from common.types import Scope

log = structlog.get_logger(__name__)


class BulkProxy:
    """Serves ranges of catalogued files, read from their origin as they are sent."""

    def __init__(
        self,
        catalog: Catalog,
        origin: Origin,
        keys: KeyRing,
        fleet_tokens: FleetTokens,
        limits: HttpLimits = DEFAULT_HTTP_LIMITS,
    ) -> None:
        self._catalog = catalog
        self._origin = origin
        self._keys = keys
        self._fleet_tokens = fleet_tokens
        self._listener = BulkListener(self._serve, limits)

    @property
    def port(self) -> int:
        return self._listener.port

    async def start(self, listen: str, *, shared: bool = False) -> int:
        """Listens on ``host:port`` (port 0: any free one) and returns the port; ``shared``: one port
        for all the workers of ``llmlb serve --workers``, as their gRPC and HTTP ports are."""
        return await self._listener.start(listen, "balancer.bulk_listening", shared=shared)

    async def stop(self) -> None:
        await self._listener.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        await serve_connection(
            reader,
            writer,
            lambda token: self._authorize(token, client),
            self._send,
            "balancer",
            self._listener.limits,
        )

    async def _authorize(self, token: Secret | None, client: str = "") -> None:
        presented = token.reveal() if token is not None else None
        if self._fleet_tokens.accepts(presented):  # one a node holds now: it expires, a revocation rotates it
            return
        await self._keys.check(presented, Scope.NODE, client=client)

    async def _send(self, request: BlobRequest, writer: asyncio.StreamWriter) -> None:
        if request.path != "/blob":
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "the balancer's proxy serves /blob only")
        model = await self._catalog.get(request.model_id)
        file = next((f for f in model.files if f.filename == request.filename), None)
        if file is None:
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"{request.filename!r} is not a file of {model.id!r}")
        start, end = parse_range(request.range_header, file.size_bytes)
        if end == start:  # a 0-byte file: nothing to ask the origin for
            writer.write(range_head(start, end, file.size_bytes, file.sha256))
            await writer.drain()
            return
        stream = self._origin.stream(
            model.origin, model.repo_id, model.revision or "main", file.filename, start, end - start
        ).__aiter__()
        try:
            first = await anext(stream)  # an origin that refuses does so before any byte: a clean error
            writer.write(range_head(start, end, file.size_bytes, file.sha256))
            writer.write(first)
            try:
                async for chunk in stream:
                    writer.write(chunk)
                    await writer.drain()
                await writer.drain()
            except LlmlbError as exc:
                # The head is out: the only honest signal left is a short body, so the node resumes.
                raise ConnectionError(exc.message) from None
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
