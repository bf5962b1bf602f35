"""Where a node reads a model file's bytes from: the origin hub, or ``Manifest.ReadBlob`` on the
balancer's proxy or on a peer node that holds the file. Each source streams from any offset, so a
download resumes where its ``.partial`` file ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import grpc
import grpc.aio

from common.config import NodeConfig, normalize_origin
from common.errors import ErrorCode, LlmlbError
from common.hub import HubFiles
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.rpc import error_from_rpc
from common.types import ManifestFile, Model


class BlobSource(Protocol):
    """Somewhere a file's bytes can be read from, starting at any offset."""

    name: str

    def stream(self, model: Model, file: ManifestFile, offset: int) -> AsyncIterator[bytes]: ...


class OriginSource:
    """The model's origin hub, reached directly (``huggingface_hub`` URLs and headers)."""

    name = "origin"

    def __init__(self, config: NodeConfig, files: HubFiles) -> None:
        self._config = config
        self._files = files

    def endpoint(self, origin: str) -> str:
        if not self._config.origin_allowed(origin):
            raise LlmlbError(
                ErrorCode.ORIGIN_NOT_ALLOWED,
                f"origin {origin} is not allowed on this node (set XLLM_ALLOWED_ORIGINS or use "
                "--download-via balancer)",
            )
        # The configured spelling keeps a mirror's path prefix when it is the default origin.
        if normalize_origin(origin) == normalize_origin(self._config.hf_endpoint):
            return self._config.hf_endpoint
        return origin

    async def stream(self, model: Model, file: ManifestFile, offset: int) -> AsyncIterator[bytes]:
        endpoint = self.endpoint(model.origin or self._config.hf_endpoint)
        async for chunk in self._files.stream(endpoint, model.repo_id, model.revision, file.filename, offset):
            yield chunk


class ReadBlobSource:
    """``Manifest.ReadBlob`` on the balancer (its origin proxy) or on a peer node holding the file."""

    def __init__(self, name: str, channel: grpc.aio.Channel) -> None:
        self.name = name
        self._stub = mgrpc.ManifestStub(channel)

    async def stream(self, model: Model, file: ManifestFile, offset: int) -> AsyncIterator[bytes]:
        call = self._stub.ReadBlob(
            mpb.ReadBlobRequest(model_id=model.id, filename=file.filename, offset=offset)
        )
        position = offset
        try:
            async for chunk in call:
                if chunk.offset != position:
                    raise LlmlbError(
                        ErrorCode.DOWNLOAD_FAILED,
                        f"{self.name} sent bytes at {chunk.offset} where {position} was expected",
                    )
                position += len(chunk.data)
                yield chunk.data
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()


def source_kind(name: str) -> str:
    """``origin``, ``balancer`` or ``peer`` for a source name like ``peer:<node-id>``: a bounded label."""
    return name.partition(":")[0]
