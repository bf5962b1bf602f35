"""gRPC ``Manifest`` servicer of a node: the files it holds, so peers can fetch from each other.

Only files the node already holds (in its models dir or on the shared dir) are served; a read never
starts a download, and every file name must be one of the model's manifest files.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import grpc.aio

from common import converters
from common.errors import ErrorCode, LlmlbError
from common.formats import read_range_end
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import rpc_errors
from node.resolver import Resolver
from node.storage import Storage

Ctx = grpc.aio.ServicerContext[Any, Any]
CHUNK_BYTES = 1024 * 1024


class NodeManifestServicer(mgrpc.ManifestServicer):
    def __init__(self, resolver: Resolver, storage: Storage, bulk_port: int = 0) -> None:
        self._resolver = resolver
        self._storage = storage
        self._bulk_port = bulk_port

    @rpc_errors
    async def GetBulkEndpoint(self, request: mpb.GetBulkEndpointRequest, context: Ctx) -> mpb.BulkEndpoint:
        """The port of this node's bulk server (``node/bulk_server.py``); 0 when it runs none."""
        return mpb.BulkEndpoint(port=self._bulk_port)

    @rpc_errors
    async def GetManifest(self, request: mpb.GetManifestRequest, context: Ctx) -> pb.ModelManifest:
        model = await self._resolver.manifest(request.model_id)
        backend = converters.backend_from_pb(request.backend) if request.backend else None
        return converters.manifest_to_pb(model, backend)

    @rpc_errors
    async def ReadBlob(self, request: mpb.ReadBlobRequest, context: Ctx) -> AsyncIterator[mpb.BlobChunk]:
        if request.offset < 0 or request.length < 0:  # refused before any lookup or file access
            read_range_end(0, request.offset, request.length)
        file, path = await self._resolver.locate(request.model_id, request.filename)
        end = read_range_end(file.size_bytes, request.offset, request.length)
        loop = asyncio.get_running_loop()
        io_threads = self._storage.io_threads
        fh = await loop.run_in_executor(io_threads, _open_at, path, request.offset)
        try:
            position = request.offset
            while position < end:
                data = await loop.run_in_executor(io_threads, fh.read, min(CHUNK_BYTES, end - position))
                if not data:
                    raise LlmlbError(ErrorCode.DOWNLOAD_FAILED, f"{request.filename} shrank while being read")
                yield mpb.BlobChunk(
                    offset=position, data=data, total_size=file.size_bytes, sha256=file.sha256
                )
                position += len(data)
        finally:
            await loop.run_in_executor(io_threads, fh.close)


def _open_at(path: Path, offset: int) -> BinaryIO:
    fh = path.open("rb")
    fh.seek(offset)
    return fh
