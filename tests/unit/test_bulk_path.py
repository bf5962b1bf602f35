"""The bulk path and ranged downloads on real sockets and files: a node's HTTP range server, the
client that reads it into a ``.partial`` in pieces, resuming pieces, and a peer that sends bad bytes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from common.config import NodeConfig, load_node_config
from common.errors import ErrorCode, LlmlbError
from common.types import FileFormat, ManifestFile, Model, ModelSource
from node.blob_sources import BlobSource, BulkSource, read_range
from node.bulk_server import BulkServer
from node.downloader import Downloader
from node.pieces import PieceMap, held_bytes, sidecar_path
from node.storage import Storage, partial_path
from node.token_auth import NodeCredentials

MiB = 1024 * 1024
DATA = hashlib.sha256(b"seed").digest() * (5 * MiB // 32 + 7)  # a little over 5 MiB, not piece-aligned
TOKEN = "fleet-secret"


def manifest_file(data: bytes = DATA, name: str = "w.gguf") -> ManifestFile:
    return ManifestFile(name, FileFormat.GGUF, len(data), hashlib.sha256(data).hexdigest())


def model(*files: ManifestFile) -> Model:
    return Model("acme/m", "acme/m", ModelSource.HF, "acme/m", "abc", "http://127.0.0.1:9", files=list(files))


@pytest.fixture
def io_threads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def config(tmp_path: Path) -> NodeConfig:
    env = {"XLLM_DOWNLOAD_PIECE_MB": "1", "XLLM_DOWNLOAD_CONNECTIONS": "3"}
    return load_node_config(models_dir=tmp_path / "models", home=tmp_path, env=env)


class RangeSource:
    """Serves ``data`` by ranges, as a peer or the origin would; records each range asked for."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self.data = data
        self.ranges: list[tuple[int, int]] = []

    async def stream(
        self, model: Model, file: ManifestFile, offset: int, length: int = 0
    ) -> AsyncIterator[bytes]:
        end = offset + length if length else len(self.data)
        self.ranges.append((offset, end))
        for start in range(offset, end, 256 * 1024):
            yield self.data[start : min(end, start + 256 * 1024)]


async def serve(tmp_path: Path, data: bytes = DATA) -> tuple[BulkServer, ManifestFile]:
    f = manifest_file(data)
    path = tmp_path / "held.gguf"
    path.write_bytes(data)
    credentials = NodeCredentials()
    credentials.set_fleet_token(TOKEN)

    async def locate(model_id: str, filename: str) -> tuple[ManifestFile, Path]:
        if (model_id, filename) != ("acme/m", f.filename):
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"this node does not hold {model_id}/{filename}")
        return f, path

    server = BulkServer(locate, credentials)
    await server.start("127.0.0.1:0")
    return server, f


async def read(source: BulkSource, f: ManifestFile, offset: int, length: int) -> bytes:
    got = bytearray()

    def write(position: int, data: memoryview) -> None:
        assert position == offset + len(got)
        got.extend(data)

    await read_range(source, model(f), f, offset, length, write)
    return bytes(got)


async def test_the_bulk_server_serves_exact_ranges_to_a_caller_with_the_fleet_token(tmp_path: Path) -> None:
    server, f = await serve(tmp_path)
    try:
        peer = BulkSource("peer:a", "127.0.0.1", server.port, lambda: TOKEN)
        assert await read(peer, f, 0, len(DATA)) == DATA
        assert await read(peer, f, 3 * MiB + 5, 1234) == DATA[3 * MiB + 5 : 3 * MiB + 5 + 1234]
        assert await read(peer, f, len(DATA) - 1, 1) == DATA[-1:]
    finally:
        await server.stop()


async def test_the_bulk_server_refuses_a_wrong_token_an_unheld_file_and_a_range_past_the_end(
    tmp_path: Path,
) -> None:
    server, f = await serve(tmp_path)
    try:
        with pytest.raises(LlmlbError) as wrong:
            await read(BulkSource("peer:a", "127.0.0.1", server.port, lambda: "guess"), f, 0, 10)
        assert wrong.value.code is ErrorCode.UNAUTHORIZED
        with pytest.raises(LlmlbError) as missing:
            await read(BulkSource("peer:a", "127.0.0.1", server.port, lambda: ""), f, 0, 10)
        assert missing.value.code is ErrorCode.UNAUTHORIZED
        peer = BulkSource("peer:a", "127.0.0.1", server.port, lambda: TOKEN)
        other = manifest_file(name="other.gguf")
        with pytest.raises(LlmlbError) as unheld:
            await read_range(peer, model(other), other, 0, 10, lambda p, d: None)
        assert unheld.value.code is ErrorCode.MODEL_NOT_FOUND and "does not hold" in unheld.value.message
        with pytest.raises(LlmlbError) as past:
            await read(peer, f, len(DATA), 10)
        assert past.value.code is ErrorCode.INVALID_REQUEST
    finally:
        await server.stop()


async def test_a_file_arrives_in_parallel_pieces_from_a_peer_verified_and_renamed(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    server, f = await serve(tmp_path)
    storage = Storage(tmp_path / "models", io_threads)
    try:
        peer = BulkSource("peer:a", "127.0.0.1", server.port, lambda: TOKEN)
        path = await Downloader(storage, config(tmp_path)).fetch(model(f), f, [peer])
    finally:
        await server.stop()
    assert path.read_bytes() == DATA
    part = partial_path(path)
    assert not part.exists() and not sidecar_path(part).exists()


async def test_a_killed_download_resumes_each_piece_where_its_sidecar_says(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    storage = Storage(tmp_path / "models", io_threads)
    f = manifest_file()
    part = partial_path(storage.file_path("acme/m", f.filename))
    part.parent.mkdir(parents=True)
    # As a killed node leaves it: piece 1 whole, piece 3 half, the rest never started.
    pieces = PieceMap.empty(len(DATA), MiB)
    pieces.filled[1], pieces.writers[1] = MiB, ["origin"]
    pieces.filled[3], pieces.writers[3] = MiB // 2, ["origin"]
    pieces.save(part)
    with part.open("wb") as fh:
        fh.truncate(len(DATA))
        fh.seek(MiB)
        fh.write(DATA[MiB : 2 * MiB])
        fh.seek(3 * MiB)
        fh.write(DATA[3 * MiB : 3 * MiB + MiB // 2])
    assert held_bytes(part) == MiB + MiB // 2
    origin = RangeSource("origin", DATA)
    path = await Downloader(storage, config(tmp_path)).fetch(model(f), f, [origin])
    assert path.read_bytes() == DATA
    fetched = sum(end - start for start, end in origin.ranges)
    assert fetched == len(DATA) - (MiB + MiB // 2)  # nothing held was fetched again
    assert (MiB, 2 * MiB) not in origin.ranges and (3 * MiB + MiB // 2, 4 * MiB) in origin.ranges


async def test_an_older_plain_prefix_partial_still_resumes(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    storage = Storage(tmp_path / "models", io_threads)
    f = manifest_file()
    part = partial_path(storage.file_path("acme/m", f.filename))
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA[: 2 * MiB + 100])  # no sidecar: what nodes before pieces wrote
    origin = RangeSource("origin", DATA)
    path = await Downloader(storage, config(tmp_path)).fetch(model(f), f, [origin])
    assert path.read_bytes() == DATA
    assert min(start for start, _ in origin.ranges) == 2 * MiB + 100


async def test_a_peer_sending_bad_bytes_is_excluded_and_its_pieces_come_from_the_origin(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    storage = Storage(tmp_path / "models", io_threads)
    f = manifest_file()
    bad = bytearray(DATA)
    bad[2 * MiB + 17] ^= 0xFF  # one flipped byte in piece 2
    liar, origin = RangeSource("peer:liar", bytes(bad)), RangeSource("origin", DATA)
    with capture_logs() as logs:
        path = await Downloader(storage, config(tmp_path)).fetch(model(f), f, [liar, origin])
    assert path.read_bytes() == DATA  # nothing corrupt kept
    assert liar.ranges and origin.ranges  # the peer was used first, then the origin refetched
    mismatch = [e for e in logs if e["event"] == "download.sha256_mismatch"]
    assert mismatch and mismatch[0]["excluded"] == ["peer:liar"]
    done = next(e for e in logs if e["event"] == "download.done")
    assert done["by_source"]["origin"] >= MiB  # per source, as the logs report it


async def test_bad_bytes_from_the_origin_alone_fail_the_download_and_keep_nothing(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    storage = Storage(tmp_path / "models", io_threads)
    f = manifest_file()
    bad = bytearray(DATA)
    bad[17] ^= 0xFF
    with pytest.raises(LlmlbError) as err:
        await Downloader(storage, config(tmp_path)).fetch(model(f), f, [RangeSource("origin", bytes(bad))])
    assert err.value.code is ErrorCode.DOWNLOAD_FAILED and "sha256" in err.value.message
    part = partial_path(storage.file_path("acme/m", f.filename))
    assert not part.exists() and not sidecar_path(part).exists()


class SlowOrigin(RangeSource):
    """An origin paced per chunk, counting every byte it sends (for "read about once")."""

    def __init__(self, data: bytes, delay: float = 0.01) -> None:
        super().__init__("origin", data)
        self.delay = delay
        self.sent = 0

    async def stream(
        self, model: Model, file: ManifestFile, offset: int, length: int = 0
    ) -> AsyncIterator[bytes]:
        async for chunk in super().stream(model, file, offset, length):
            await asyncio.sleep(self.delay)
            self.sent += len(chunk)
            yield chunk


class SwarmNode:
    """One node of an in-process swarm: its models dir, downloader and bulk server."""

    def __init__(self, name: str, tmp_path: Path, io_threads: ThreadPoolExecutor) -> None:
        self.name = f"peer:{name}"
        self.storage = Storage(tmp_path / name / "models", io_threads)
        self.downloader = Downloader(self.storage, config(tmp_path / name))
        credentials = NodeCredentials()
        credentials.set_fleet_token(TOKEN)
        self.server = BulkServer(self._locate, credentials, self.downloader.partial)
        self.peers: list[SwarmNode] = []
        self.file: ManifestFile | None = None

    async def _locate(self, model_id: str, filename: str) -> tuple[ManifestFile, Path]:
        path = self.storage.file_path(model_id, filename)
        if self.file is None or not path.exists():
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, "not held whole")  # the partial, if any, is served
        return self.file, path

    async def swarm(self) -> list[BlobSource]:
        return [
            BulkSource(p.name, "127.0.0.1", p.server.port, lambda: TOKEN, partial=True)
            for p in self.peers
            if p.server.port
        ]

    async def fetch(self, f: ManifestFile, origin: BlobSource) -> Path:
        self.file = f
        sources = [*await self.swarm(), origin]
        return await self.downloader.fetch(model(f), f, sources, refresh=self.swarm, me=self.name)


async def test_two_nodes_fetching_one_file_at_once_read_the_origin_once_and_trade_pieces(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    data = DATA
    f = manifest_file(data)
    origin = SlowOrigin(data)
    a, b = SwarmNode("a", tmp_path, io_threads), SwarmNode("b", tmp_path, io_threads)
    a.peers, b.peers = [b], [a]
    await a.server.start("127.0.0.1:0")
    await b.server.start("127.0.0.1:0")
    try:
        with capture_logs() as logs:
            paths = await asyncio.gather(a.fetch(f, origin), b.fetch(f, origin))
    finally:
        await a.server.stop()
        await b.server.stop()
    assert [p.read_bytes() == data for p in paths] == [True, True]
    assert origin.sent <= 1.1 * len(data), sorted(origin.ranges)  # about once for the pair, not twice
    done = {e["by_source"].get("origin", 0) for e in logs if e["event"] == "download.done"}
    assert all(0 < n < len(data) for n in done)  # each read a share of it, and the rest from the other


async def test_a_peer_that_leaves_mid_swarm_costs_only_a_refetch_from_the_origin(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    data = DATA[: 6 * MiB]
    f = manifest_file(data)
    origin = SlowOrigin(data)
    stays, leaves = SwarmNode("a", tmp_path, io_threads), SwarmNode("b", tmp_path, io_threads)
    stays.peers, leaves.peers = [leaves], [stays]
    await stays.server.start("127.0.0.1:0")
    await leaves.server.start("127.0.0.1:0")
    leaving = asyncio.create_task(leaves.fetch(f, origin))
    try:
        staying = asyncio.create_task(stays.fetch(f, origin))
        part = partial_path(leaves.storage.file_path("acme/m", f.filename))
        while held_bytes(part) < MiB:  # noqa: ASYNC110 - polls a file another task writes
            await asyncio.sleep(0.02)  # the leaver holds a piece of its share, then goes
        leaving.cancel()
        await leaves.server.stop()  # its port is 0 now: no longer advertised
        path = await asyncio.wait_for(staying, 60)
    finally:
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        await stays.server.stop()
    assert path.read_bytes() == data
