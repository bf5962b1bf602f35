"""Where a node reads a model file's bytes from: the origin hub, a peer node's bulk (HTTP range)
server, or ``Manifest.ReadBlob`` on the balancer's proxy or on a peer without a bulk server. Each
source reads any byte range, so a download fetches pieces at once and resumes each where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Protocol
from urllib.parse import quote

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

    def stream(self, model: Model, file: ManifestFile, offset: int, length: int = 0) -> AsyncIterator[bytes]:
        """The bytes from ``offset``: ``length`` of them, or to the end when 0."""
        ...


# Receives a range's bytes as they arrive: (position in the file, the bytes, valid only during the call).
RangeWriter = Callable[[int, memoryview], None]
BULK_BUFFER_BYTES = 1024 * 1024


async def read_range(
    source: BlobSource, model: Model, file: ManifestFile, offset: int, length: int, write: RangeWriter
) -> None:
    """Hands bytes ``[offset, offset + length)`` of ``file`` from ``source`` to ``write``, in order.

    A source with ``read_into`` (the bulk path) fills one reused buffer straight from its socket;
    the others yield chunks. Raises ``download_failed`` when the source ends early.
    """
    reader = getattr(source, "read_into", None)
    if reader is not None:
        await reader(model, file, offset, length, write)
        return
    end = offset + length
    position = offset
    stream = source.stream(model, file, offset, length)
    try:
        async for chunk in stream:
            view = memoryview(chunk)[: end - position]  # a source that ignores ``length`` is cut off
            write(position, view)
            position += len(view)
            if position >= end:
                break
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):  # the source's own error is the one that matters
                await aclose()
    if position < end:
        raise LlmlbError(
            ErrorCode.DOWNLOAD_FAILED,
            f"{source.name} ended {file.filename} at byte {position}, {end} was expected",
        )


class OriginSource:
    """The model's origin hub, reached directly (``huggingface_hub`` URLs and headers)."""

    name = "origin"
    via = "http"

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

    async def stream(
        self, model: Model, file: ManifestFile, offset: int, length: int = 0
    ) -> AsyncIterator[bytes]:
        endpoint = self.endpoint(model.origin or self._config.hf_endpoint)
        async for chunk in self._files.stream(
            endpoint, model.repo_id, model.revision, file.filename, offset, length
        ):
            yield chunk


class ReadBlobSource:
    """``Manifest.ReadBlob`` on the balancer (its origin proxy) or on a peer node holding the file."""

    via = "grpc"

    def __init__(self, name: str, channel: grpc.aio.Channel) -> None:
        self.name = name
        self._stub = mgrpc.ManifestStub(channel)

    async def stream(
        self, model: Model, file: ManifestFile, offset: int, length: int = 0
    ) -> AsyncIterator[bytes]:
        call = self._stub.ReadBlob(
            mpb.ReadBlobRequest(model_id=model.id, filename=file.filename, offset=offset, length=length)
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


class BulkSource:
    """A bulk server (``node/bulk_server.py``): one HTTP/1.1 range request per read.

    Bytes go from the socket into one reused buffer (``sock_recv_into``) and from there to the
    caller's ``write`` (a ``pwrite`` into the ``.partial``), so memory stays flat with the file's
    size. The bearer token is the one the node presents to its peers' gRPC doors.
    """

    via = "bulk"

    def __init__(
        self, name: str, host: str, port: int, token: Callable[[], str], *, partial: bool = False
    ) -> None:
        self.name = name
        self._host = host.strip("[]")
        self._port = port
        self._token = token
        self.partial = partial  # a peer still downloading the file: it holds some ranges only

    async def piece_map(
        self, model: Model, file: ManifestFile
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """What a peer still downloading holds and is fetching now: ([start, end) held, ... fetching)."""
        loop = asyncio.get_running_loop()
        query = f"model={quote(model.id, safe='')}&file={quote(file.filename, safe='')}"
        request = (
            f"GET /pieces?{query} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Authorization: Bearer {self._token()}\r\nConnection: close\r\n\r\n"
        ).encode()
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (self._host, self._port))
            await loop.sock_sendall(sock, request)
            raw = b""
            while chunk := await loop.sock_recv(sock, 65536):
                raw += chunk
                if len(raw) > 4 * 1024 * 1024:
                    raise LlmlbError(ErrorCode.DOWNLOAD_FAILED, f"{self.name} sent an oversized piece map")
        except OSError as exc:
            raise LlmlbError(ErrorCode.DOWNLOAD_FAILED, f"{self.name} piece map failed: {exc!r}") from None
        finally:
            sock.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = _status(head)
        if status != 200:
            raise _refusal(self.name, status, body)
        try:
            found = json.loads(body)
            held = [(int(a), int(b)) for a, b in found["held"]]
            fetching = [(int(a), int(b)) for a, b in found["fetching"]]
        except (ValueError, KeyError, TypeError):
            raise LlmlbError(ErrorCode.DOWNLOAD_FAILED, f"{self.name} sent a bad piece map") from None
        return held, fetching

    def _request(self, model: Model, file: ManifestFile, offset: int, length: int) -> bytes:
        last = "" if not length else str(offset + length - 1)
        lines = [
            f"GET /blob?model={quote(model.id, safe='')}&file={quote(file.filename, safe='')} HTTP/1.1",
            f"Host: {self._host}:{self._port}",
            f"Authorization: Bearer {self._token()}",
            f"Range: bytes={offset}-{last}",
            "Connection: close",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def read_into(
        self, model: Model, file: ManifestFile, offset: int, length: int, write: RangeWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        end = offset + length if length else file.size_bytes
        buffer = bytearray(BULK_BUFFER_BYTES)
        view = memoryview(buffer)
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (self._host, self._port))
            await loop.sock_sendall(sock, self._request(model, file, offset, end - offset))
            got, head_end = 0, -1
            while head_end < 0:
                n = await loop.sock_recv_into(sock, view[got:])
                if n == 0:
                    raise LlmlbError(ErrorCode.DOWNLOAD_FAILED, f"{self.name} closed before answering")
                got += n
                head_end = buffer.find(b"\r\n\r\n", 0, got)
                if head_end < 0 and got == len(buffer):
                    raise LlmlbError(ErrorCode.DOWNLOAD_FAILED, f"{self.name} sent an oversized header")
            status = _status(bytes(view[:head_end]))
            position = offset
            body = view[head_end + 4 : got]
            if status != 206:
                rest = bytes(body)
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(2):
                        while (n := await loop.sock_recv_into(sock, view)) > 0 and len(rest) < 65536:
                            rest += bytes(view[:n])
                raise _refusal(self.name, status, rest)
            if len(body):
                write(position, body[: end - position])
                position += min(len(body), end - position)
            while position < end:
                n = await loop.sock_recv_into(sock, view[: min(len(buffer), end - position)])
                if n == 0:
                    raise LlmlbError(
                        ErrorCode.DOWNLOAD_FAILED,
                        f"{self.name} ended {file.filename} at byte {position}, {end} was expected",
                    )
                write(position, view[:n])
                position += n
        except OSError as exc:
            raise LlmlbError(ErrorCode.DOWNLOAD_FAILED, f"{self.name} bulk read failed: {exc!r}") from None
        finally:
            sock.close()

    async def stream(
        self, model: Model, file: ManifestFile, offset: int, length: int = 0
    ) -> AsyncIterator[bytes]:
        """The same range as chunks, for callers that want ``bytes`` (each a copy)."""
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)

        def write(position: int, data: memoryview) -> None:
            chunks.put_nowait(bytes(data))

        # Simple and bounded: reads one buffer's worth at a time.
        end = offset + length if length else file.size_bytes
        position = offset
        while position < end:
            step = min(BULK_BUFFER_BYTES * 4, end - position)
            await self.read_into(model, file, position, step, write)
            while not chunks.empty():
                chunk = chunks.get_nowait()
                assert chunk is not None
                yield chunk
            position += step


def _status(head: bytes) -> int:
    parts = head.split(b"\r\n", 1)[0].split()
    try:
        return int(parts[1])
    except (IndexError, ValueError):
        return 0


def _refusal(name: str, status: int, body: bytes) -> LlmlbError:
    """The error a bulk server's refusal stands for: its JSON error code when it sent one."""
    try:
        error = json.loads(body.decode())["error"]
        return LlmlbError(ErrorCode(error["code"]), f"{name}: {error['message']}")
    except (ValueError, KeyError, TypeError):
        fallback = {
            401: ErrorCode.UNAUTHORIZED,
            404: ErrorCode.MODEL_NOT_FOUND,
            416: ErrorCode.INVALID_REQUEST,
        }
        return LlmlbError(fallback.get(status, ErrorCode.DOWNLOAD_FAILED), f"{name} answered HTTP {status}")


def source_kind(name: str) -> str:
    """``origin``, ``balancer`` or ``peer`` for a source name like ``peer:<node-id>``: a bounded label."""
    return name.partition(":")[0]
