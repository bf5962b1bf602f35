"""gRPC ``Manifest`` servicer of the balancer: manifests from the store, bytes proxied from the origin."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from balancer.catalog import Catalog
from balancer.origin import Origin
from common import converters
from common.errors import ErrorCode, LlmlbError
from common.formats import read_range_end
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import rpc_errors

Ctx = grpc.aio.ServicerContext[Any, Any]


class ManifestServicer(mgrpc.ManifestServicer):
    def __init__(self, catalog: Catalog, origin: Origin, bulk_port: int = 0) -> None:
        self._catalog = catalog
        self._origin = origin
        self._bulk_port = bulk_port

    @rpc_errors
    async def GetBulkEndpoint(self, request: mpb.GetBulkEndpointRequest, context: Ctx) -> mpb.BulkEndpoint:
        """The port of this balancer's bulk proxy (``balancer/bulk_proxy.py``); 0 when off."""
        return mpb.BulkEndpoint(port=self._bulk_port)

    @rpc_errors
    async def GetManifest(self, request: mpb.GetManifestRequest, context: Ctx) -> pb.ModelManifest:
        model = await self._catalog.get(request.model_id)
        backend = converters.backend_from_pb(request.backend) if request.backend else None
        return converters.manifest_to_pb(model, backend)

    @rpc_errors
    async def ReadBlob(self, request: mpb.ReadBlobRequest, context: Ctx) -> AsyncIterator[mpb.BlobChunk]:
        model = await self._catalog.get(request.model_id)
        file = next((f for f in model.files if f.filename == request.filename), None)
        if file is None:
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"{request.filename!r} is not a file of {model.id!r}")
        end = read_range_end(file.size_bytes, request.offset, request.length)
        length = end - request.offset if request.length else 0  # 0: to the end, one open Range
        position = request.offset
        # Pass-through: each chunk from the origin goes to the caller as it arrives, nothing is kept.
        async for data in self._origin.stream(
            model.origin, model.repo_id, model.revision or "main", file.filename, request.offset, length
        ):
            yield mpb.BlobChunk(offset=position, data=data, total_size=file.size_bytes, sha256=file.sha256)
            position += len(data)
