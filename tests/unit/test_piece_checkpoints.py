"""The sidecar's rules, without sockets: when a download's piece map is checkpointed, that it never
claims a byte before the bytes are synced, and that a download cut off at any moment (a kill leaves
the files as they are) resumes every piece from its last checkpoint."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.config import NodeConfig, load_node_config
from common.types import FileFormat, ManifestFile, Model, ModelSource
from node.downloader import Downloader
from node.pieces import Checkpoints, PieceMap, held_bytes, load_pieces, sidecar_path, write_checkpoint
from node.storage import Storage, partial_path
from tests.fixtures.eventually import eventually_async

MiB = 1024 * 1024
DATA = hashlib.sha256(b"checkpoints").digest() * (8 * MiB // 32 + 5)  # 8 MiB and a bit: 9 pieces of 1 MiB


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_checkpoint_is_due_half_a_second_after_the_last_or_once_one_percent_of_the_file_arrived() -> None:
    clock = Clock()
    size = 100 * MiB
    pieces = PieceMap.empty(size, 4 * MiB)
    checkpoints = Checkpoints(size, clock=clock)
    assert checkpoints.due(pieces)  # the first map is saved before any byte is written
    checkpoints.take(pieces)
    clock.now += 60
    assert checkpoints.next_in(pieces) is None  # nothing arrived: nothing to save, however long

    checkpoints.take(pieces)
    clock.now += 0.1
    pieces.filled[0] = MiB // 2  # half a percent
    assert checkpoints.next_in(pieces) == pytest.approx(0.4)
    clock.now += 0.4
    assert checkpoints.due(pieces)  # half a second behind: saved whatever the amount

    saved = checkpoints.take(pieces)
    pieces.filled[1] = MiB // 2
    pieces.filled[2] = MiB // 2  # one percent since the last, across two pieces, at once
    assert checkpoints.due(pieces)
    assert saved.filled[:3] == [MiB // 2, 0, 0]  # the copy taken keeps what it claimed

    checkpoints.take(pieces)
    pieces.filled[3] = 4 * MiB  # a fast link: a whole piece within the half second
    assert checkpoints.due(pieces)


def test_a_checkpoint_syncs_the_bytes_before_the_sidecar_claims_them_and_claims_no_later_bytes(
    tmp_path: Path,
) -> None:
    size = 4 * MiB
    part = tmp_path / "w.gguf.partial"
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pieces = PieceMap.empty(size, MiB)
        checkpoints = Checkpoints(size)
        write_checkpoint(fd, part, checkpoints.take(pieces))
        os.ftruncate(fd, size)
        os.pwrite(fd, DATA[:MiB], 0)
        os.pwrite(fd, DATA[2 * MiB : 2 * MiB + 1000], 2 * MiB)
        pieces.filled[0], pieces.filled[2] = MiB, 1000
        snapshot = checkpoints.take(pieces)
        pieces.filled[3] = 500  # written after the copy, while its sync runs: not claimed by it

        claimed_at_sync: list[int] = []

        def sync(synced: int) -> None:
            claimed_at_sync.append(held_bytes(part))
            os.fdatasync(synced)

        write_checkpoint(fd, part, snapshot, sync=sync)
    finally:
        os.close(fd)
    assert claimed_at_sync == [0]  # the data was synced while the sidecar still claimed none of it
    assert load_pieces(part, size, MiB).filled == [MiB, 0, 1000, 0]
    assert not sidecar_path(part).with_name(sidecar_path(part).name + ".tmp").exists()


# -- a download cut off mid-way ---------------------------------------------------------------------


def manifest_file(data: bytes = DATA) -> ManifestFile:
    return ManifestFile("w.gguf", FileFormat.GGUF, len(data), hashlib.sha256(data).hexdigest())


def model(f: ManifestFile) -> Model:
    return Model("acme/m", "acme/m", ModelSource.HF, "acme/m", "abc", "http://127.0.0.1:9", files=[f])


def config(tmp_path: Path) -> NodeConfig:
    env = {"XLLM_DOWNLOAD_PIECE_MB": "1", "XLLM_DOWNLOAD_CONNECTIONS": "4"}
    return load_node_config(models_dir=tmp_path / "models", home=tmp_path, env=env)


@pytest.fixture
def io_threads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


class StallingOrigin:
    """Serves ranges in 64 KiB chunks; with ``stall_at`` set, goes silent that far into each range."""

    name = "origin"

    def __init__(self, data: bytes, stall_at: int | None = None) -> None:
        self.data = data
        self.stall_at = stall_at
        self.ranges: list[tuple[int, int]] = []
        self.sent = 0

    async def stream(
        self, model: Model, file: ManifestFile, offset: int, length: int = 0
    ) -> AsyncIterator[bytes]:
        end = offset + length if length else len(self.data)
        self.ranges.append((offset, end))
        if self.stall_at is not None:
            end = min(end, offset + self.stall_at)
        for start in range(offset, end, 64 * 1024):
            chunk = self.data[start : min(end, start + 64 * 1024)]
            self.sent += len(chunk)
            yield chunk
        if self.stall_at is not None:
            await asyncio.Event().wait()  # silent, as a link that stopped moving


async def test_a_download_cut_off_at_any_moment_resumes_every_piece_from_its_last_checkpoint(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    f = manifest_file()
    first = Storage(tmp_path / "first" / "models", io_threads)
    part = partial_path(first.file_path("acme/m", f.filename))
    stalling = StallingOrigin(DATA, stall_at=MiB // 2 + 64 * 1024)
    cut = asyncio.create_task(Downloader(first, config(tmp_path / "first")).fetch(model(f), f, [stalling]))
    try:
        # Four pieces in flight, each part-way, then the link goes silent. Within the checkpoint
        # interval the sidecar on disk claims every byte written, with no further write to prompt it.
        written = 4 * (MiB // 2 + 64 * 1024)
        await eventually_async(lambda: stalling.sent == written, 10, "four pieces part-way")
        await eventually_async(lambda: held_bytes(part) == written, 2, "the sidecar claiming them")
        # What a SIGKILL now would leave: the .partial and the sidecar as they are on disk.
        second = Storage(tmp_path / "second" / "models", io_threads)
        left = partial_path(second.file_path("acme/m", f.filename))
        left.parent.mkdir(parents=True)
        shutil.copyfile(part, left)
        shutil.copyfile(sidecar_path(part), sidecar_path(left))
    finally:
        cut.cancel()
        await asyncio.gather(cut, return_exceptions=True)

    origin = StallingOrigin(DATA)
    path = await Downloader(second, config(tmp_path / "second")).fetch(model(f), f, [origin])
    assert path.read_bytes() == DATA
    assert origin.sent == len(DATA) - written  # not one byte held was fetched again
    resumed = sorted(start for start, _ in origin.ranges if start % MiB)
    assert resumed == [i * MiB + MiB // 2 + 64 * 1024 for i in range(4)]  # each piece where it stopped
