"""One file's bytes into its ``.partial``: several pieces at once, from several sources, verified.

The file is split into pieces (``XLLM_DOWNLOAD_PIECE_MB``); up to ``XLLM_DOWNLOAD_CONNECTIONS``
pieces are fetched at once, each written in place with ``pwrite``, each resumed where it stopped
after a failure (the sidecar in ``node/pieces.py`` keeps that across a kill). Peers are preferred
over the origin, the least busy first. The contiguous filled prefix is hashed while later pieces
arrive (read back from the page cache, in a thread), so the final sha256 costs only the tail.

A final sha256 mismatch is blamed on the peers that wrote pieces (the origin is the reference): they
are excluded for this file, their pieces are fetched again from the other sources, and the file is
hashed again. With no peer to blame, nothing is kept and the download fails.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path

import structlog

from common.errors import ErrorCode, LlmlbError
from common.metrics import NodeMetrics
from common.types import ManifestFile, Model
from node.blob_sources import BlobSource, read_range, source_kind
from node.pieces import PieceMap, discard, load_pieces

log = structlog.get_logger(__name__)

ATTEMPTS_PER_SOURCE = 3  # failures in a row before a source is dropped for this file
HASH_BLOCK = 4 * 1024 * 1024
SIDECAR_EVERY_S = 1.0  # how often a piece's progress is saved while it is fetched
UNKNOWN_WRITER = "unknown"  # bytes an older node wrote (a plain-prefix .partial)
_pwrite = os.pwrite  # one name for every write into a .partial (a full disk is drilled through it)


class RangedTransfer:
    """Fetches ``file`` into ``part`` from ``sources``; ``run`` returns the verified sha256."""

    def __init__(
        self,
        model: Model,
        file: ManifestFile,
        part: Path,
        sources: Sequence[BlobSource],
        *,
        connections: int,
        piece_bytes: int,
        stall_s: float,
        deadline: float,
        io_threads: Executor,
        metrics: NodeMetrics,
        on_done: Callable[[int, dict[str, int]], None],
    ) -> None:
        self._model = model
        self._file = file
        self._part = part
        self._sources = list(sources)
        self._connections = max(1, connections)
        self._piece_bytes = max(1, piece_bytes)
        self._stall_s = stall_s
        self._deadline = deadline  # time.monotonic() by which it must be done
        self._io = io_threads
        self._metrics = metrics
        self._on_done = on_done  # (bytes held, bytes written per source) after each write
        self._dead: dict[str, str] = {}  # source name -> why it is no longer asked
        self._failures: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._by_source: dict[str, int] = {}
        self._fd = -1
        self._pieces = PieceMap.empty(file.size_bytes, self._piece_bytes)
        self._digest = hashlib.sha256()
        self._hashed = 0
        self._hashing: asyncio.Task[None] | None = None
        self._saved_at = 0.0

    async def run(self) -> str:
        loop = asyncio.get_running_loop()
        size = self._file.size_bytes
        self._pieces = await loop.run_in_executor(self._io, load_pieces, self._part, size, self._piece_bytes)
        self._fd = await loop.run_in_executor(self._io, self._open)
        try:
            for _ in range(len(self._sources) + 2):  # each round drops a source, so this ends
                todo = [i for i in range(len(self._pieces.filled)) if not self._pieces.complete(i)]
                await self._fetch_all(todo)
                digest = await self._hash_to(size)
                if not self._file.sha256 or digest == self._file.sha256:
                    return digest
                if not self._blame(digest):
                    raise LlmlbError(
                        ErrorCode.DOWNLOAD_FAILED,
                        f"sha256 of {self._file.filename} is {digest[:12]}…, the manifest says "
                        f"{self._file.sha256[:12]}…; nothing was kept",
                    )
            raise LlmlbError(ErrorCode.DOWNLOAD_FAILED, f"{self._file.filename} never matched its sha256")
        except BaseException as exc:
            await self._stop_hashing()
            await loop.run_in_executor(self._io, os.close, self._fd)
            self._fd = -1
            # Wrong bytes, a full disk, or nothing fetched: nothing stays. Else the next try resumes.
            wrong = isinstance(exc, LlmlbError) and (
                exc.code is ErrorCode.INSUFFICIENT_STORAGE or "sha256" in exc.message
            )
            if wrong or self._pieces.done_bytes() == 0:
                await loop.run_in_executor(self._io, discard, self._part)
            else:
                self._pieces.save(self._part)
            raise
        finally:
            if self._fd >= 0:
                await loop.run_in_executor(self._io, os.close, self._fd)

    @property
    def by_source(self) -> dict[str, int]:
        return dict(self._by_source)

    def _open(self) -> int:
        fd = os.open(self._part, os.O_RDWR | os.O_CREAT, 0o644)
        # The map goes first: a full-length .partial without one reads as a whole plain prefix.
        self._pieces.save(self._part)
        os.ftruncate(fd, self._file.size_bytes)
        return fd

    # -- pieces -----------------------------------------------------------------------------------

    async def _fetch_all(self, todo: list[int]) -> None:
        queue = list(reversed(todo))

        async def worker() -> None:
            while queue:
                await self._fetch_piece(queue.pop())

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self._connections, len(todo))):
                    group.create_task(worker())
        except BaseExceptionGroup as group_exc:
            raise _first(group_exc) from None

    def _pick(self) -> BlobSource:
        live = [s for s in self._sources if s.name not in self._dead]
        if not live:
            reasons = "; ".join(f"{name}: {why}" for name, why in self._dead.items())
            raise LlmlbError(
                ErrorCode.DOWNLOAD_FAILED,
                f"could not download {self._model.id}/{self._file.filename}: {reasons}",
            )
        # Peers before the origin or the proxy; among equals, the one with the fewest pieces in flight.
        return min(
            live,
            key=lambda s: (source_kind(s.name) != "peer", self._active.get(s.name, 0)),
        )

    async def _fetch_piece(self, index: int) -> None:
        while not self._pieces.complete(index):
            source = self._pick()
            try:
                await self._read_piece(source, index)
                self._failures[source.name] = 0
            except LlmlbError as exc:
                if exc.code is ErrorCode.INSUFFICIENT_STORAGE:
                    raise
                if time.monotonic() >= self._deadline:
                    raise LlmlbError(
                        ErrorCode.DOWNLOAD_FAILED,
                        f"download of {self._file.filename} took longer than the total timeout "
                        "(XLLM_DOWNLOAD_TIMEOUT)",
                    ) from None
                failures = self._failures.get(source.name, 0) + 1
                self._failures[source.name] = failures
                log.warning(
                    "download.attempt_failed",
                    model_id=self._model.id,
                    filename=self._file.filename,
                    source=source.name,
                    piece=index,
                    attempt=failures,
                    error=exc.message,
                )
                retryable = exc.code in (ErrorCode.DOWNLOAD_FAILED, ErrorCode.TIMEOUT)
                if not retryable or failures >= ATTEMPTS_PER_SOURCE:
                    self._dead.setdefault(source.name, exc.message)
                else:
                    await asyncio.sleep(0.2 * failures)
        await self._piece_done()

    async def _read_piece(self, source: BlobSource, index: int) -> None:
        pieces = self._pieces
        start, end = pieces.bounds(index)
        offset = start + pieces.filled[index]
        if offset >= end:
            return
        loop = asyncio.get_running_loop()
        fd = self._fd
        counter = self._metrics.download_bytes.labels(source_kind(source.name))
        writers = pieces.writers[index]
        if source.name not in writers:
            writers.append(source.name)
        self._active[source.name] = self._active.get(source.name, 0) + 1
        limit = loop.time() + (self._deadline - time.monotonic())

        def write(position: int, data: memoryview) -> None:
            if position != start + pieces.filled[index]:
                raise LlmlbError(
                    ErrorCode.DOWNLOAD_FAILED, f"{source.name} sent bytes at {position} out of order"
                )
            written = 0
            try:
                while written < len(data):
                    written += _pwrite(fd, data[written:], position + written)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise LlmlbError(
                        ErrorCode.INSUFFICIENT_STORAGE,
                        f"insufficient storage: the disk filled while writing {self._file.filename}",
                    ) from None
                raise
            pieces.filled[index] += written
            self._by_source[source.name] = self._by_source.get(source.name, 0) + written
            counter.inc(written)
            timer.reschedule(min(loop.time() + self._stall_s, limit))
            self._on_done(pieces.done_bytes(), self._by_source)
            now = time.monotonic()
            if now - self._saved_at >= SIDECAR_EVERY_S:
                self._saved_at = now
                pieces.save(self._part)

        try:
            async with asyncio.timeout(min(loop.time() + self._stall_s, limit)) as timer:
                await read_range(source, self._model, self._file, offset, end - offset, write)
        except TimeoutError:
            if loop.time() >= limit:
                raise LlmlbError(ErrorCode.TIMEOUT, "total download timeout reached") from None
            raise LlmlbError(
                ErrorCode.TIMEOUT, f"no bytes for {self._stall_s:g}s (XLLM_DOWNLOAD_STALL_TIMEOUT)"
            ) from None
        finally:
            self._active[source.name] -= 1

    async def _piece_done(self) -> None:
        self._saved_at = time.monotonic()
        # On the loop, like the saves between: a few hundred bytes, and never two at once.
        self._pieces.save(self._part)
        if self._hashing is None or self._hashing.done():
            self._hashing = asyncio.create_task(self._hash_prefix())

    # -- hashing ----------------------------------------------------------------------------------

    async def _hash_prefix(self) -> None:
        """Hashes the filled prefix as it grows, off the event loop."""
        loop = asyncio.get_running_loop()
        while (upto := self._pieces.prefix()) > self._hashed:
            await loop.run_in_executor(self._io, _hash_range, self._fd, self._digest, self._hashed, upto)
            self._hashed = upto

    async def _hash_to(self, size: int) -> str:
        if self._hashing is not None:
            await self._hashing
        await self._hash_prefix()
        if self._hashed != size:  # cannot happen once every piece is complete; guards the invariant
            raise LlmlbError(ErrorCode.INTERNAL, f"hashed {self._hashed} of {size} bytes")
        return self._digest.hexdigest()

    async def _stop_hashing(self) -> None:
        if self._hashing is not None and not self._hashing.done():
            await asyncio.gather(self._hashing, return_exceptions=True)

    def _blame(self, digest: str) -> bool:
        """After a mismatch: drops the peers that wrote pieces and clears those pieces; False if none."""
        suspects = {
            w for ws in self._pieces.writers for w in ws if source_kind(w) == "peer" or w == UNKNOWN_WRITER
        }
        if not suspects:
            return False
        for name in suspects:
            self._dead[name] = f"its bytes failed the sha256 check ({digest[:12]}…)"
        for index, ws in enumerate(self._pieces.writers):
            if suspects.intersection(ws):
                self._pieces.reset(index)
        log.warning(
            "download.sha256_mismatch",
            model_id=self._model.id,
            filename=self._file.filename,
            excluded=sorted(suspects),
            refetching_bytes=self._file.size_bytes - self._pieces.done_bytes(),
        )
        self._digest = hashlib.sha256()
        self._hashed = 0
        return True


def _hash_range(fd: int, digest: hashlib._Hash, start: int, end: int) -> None:
    """Feeds bytes ``[start, end)`` of ``fd`` to ``digest`` through one reused buffer (flat memory)."""
    buffer = bytearray(min(HASH_BLOCK, max(1, end - start)))
    view = memoryview(buffer)
    position = start
    while position < end:
        n = os.preadv(fd, [view[: min(len(buffer), end - position)]], position)
        if n <= 0:
            raise LlmlbError(ErrorCode.DOWNLOAD_FAILED, "the .partial file shrank while being hashed")
        digest.update(view[:n])
        position += n


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a caller should see from a group of workers: ours first, then anything else."""
    flat: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            flat.append(exc)

    walk(group)
    for exc in flat:
        if isinstance(exc, LlmlbError) and exc.code is ErrorCode.INSUFFICIENT_STORAGE:
            return exc
    for exc in flat:
        if isinstance(exc, LlmlbError):
            return exc
    return flat[0]
