"""One file's bytes into its ``.partial``: several pieces at once, from several sources, verified.

The file is split into pieces (``XLLM_DOWNLOAD_PIECE_MB``); up to ``XLLM_DOWNLOAD_CONNECTIONS``
pieces are fetched at once, each written in place with ``pwrite``, each resumed where it stopped
after a failure (the sidecar in ``node/pieces.py`` keeps that across a kill: checkpoints taken as
bytes arrive sync the data, then save the map, in an I/O thread). Peers are preferred
over the origin, the least busy first. The contiguous filled prefix is hashed while later pieces
arrive (read back from the page cache, in a thread), so the final sha256 costs only the tail.

A final sha256 mismatch is blamed on the peers that wrote pieces (the origin is the reference): they
are excluded for this file, their pieces are fetched again from the other sources, and the file is
hashed again. With no peer to blame, nothing is kept and the download fails.

The swarm: peers still downloading the same file serve the ranges they hold. Each piece has one
owner among them (rendezvous hashing); a node reads from the origin only its own pieces (or ones
nobody holds or is fetching) and waits for the rest to appear at a peer, so the fleet reads the
origin about once.

One module although long: piece scheduling, the swarm's view and hashing share one piece map and
one set of per-source counters; split, each part would reach into the others' state.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path

import structlog

from common.bulk_http import covers, overlaps
from common.errors import ErrorCode, LlmlbError
from common.metrics import NodeMetrics
from common.types import ManifestFile, Model
from node.blob_sources import BlobSource, read_range, source_kind
from node.pieces import Checkpoints, PieceMap, discard, load_pieces, write_checkpoint

log = structlog.get_logger(__name__)

ATTEMPTS_PER_SOURCE = 3  # failures in a row before a source is dropped for this file
HASH_BLOCK = 4 * 1024 * 1024
SWARM_POLL_S = 0.25  # how often the piece maps of peers still downloading are read
SWARM_REFRESH_S = 1.0  # how often the balancer is asked again who holds or is fetching the file
SWARM_MIN_BYTES = 64 * 1024 * 1024  # smaller files are not worth waiting for a swarm to form
SWARM_SETTLE_ROUNDS = 3  # balancer lookups (SWARM_POLL_S apart) before a large file's first read
SWARM_ABSENT_S = 5.0  # a peer listed as downloading with nothing running that long has left
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
        me: str = "",
        refresh: Callable[[], Awaitable[list[BlobSource]]] | None = None,
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
        self._checkpoints = Checkpoints(file.size_bytes)
        self._checkpointing: asyncio.Task[None] | None = None
        self._checkpoint_now = asyncio.Event()  # wakes a checkpointer waiting out the interval
        self._checkpoints_stopped = False
        # The swarm: this node's source name as its peers know it ("" when it has none), how to ask
        # the balancer again who holds or is fetching the file, and what each such peer holds.
        self._me = me
        self._refresh = refresh
        self._maps: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}
        self._reading: set[int] = set()  # pieces being read now, by this node
        self._not_running: dict[str, int] = {}  # peer -> piece-map polls that found no download there

    # -- what peers see of this download (node/bulk_server.py) -----------------------------------

    @property
    def file(self) -> ManifestFile:
        return self._file

    @property
    def part(self) -> Path:
        return self._part

    def held_ranges(self) -> list[tuple[int, int]]:
        return self._pieces.ranges()

    def fetching_ranges(self) -> list[tuple[int, int]]:
        return [self._pieces.bounds(i) for i in sorted(self._reading)]

    async def run(self) -> str:
        loop = asyncio.get_running_loop()
        size = self._file.size_bytes
        self._pieces = await loop.run_in_executor(self._io, load_pieces, self._part, size, self._piece_bytes)
        self._fd = await loop.run_in_executor(self._io, self._open)
        await self._settle_swarm()
        watcher = asyncio.create_task(self._watch_swarm()) if self._refresh is not None else None
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
            await self._stop_checkpoint()
            # Wrong bytes, a full disk, or nothing fetched: nothing stays. Else the next try resumes.
            wrong = isinstance(exc, LlmlbError) and (
                exc.code is ErrorCode.INSUFFICIENT_STORAGE or "sha256" in exc.message
            )
            keep = not wrong and self._pieces.done_bytes() > 0
            if keep:
                await self._write_checkpoint(self._checkpoints.take(self._pieces))
            await loop.run_in_executor(self._io, os.close, self._fd)
            self._fd = -1
            if not keep:
                await loop.run_in_executor(self._io, discard, self._part)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            await self._stop_checkpoint()
            if self._fd >= 0:
                await loop.run_in_executor(self._io, os.close, self._fd)

    @property
    def by_source(self) -> dict[str, int]:
        return dict(self._by_source)

    def _open(self) -> int:
        fd = os.open(self._part, os.O_RDWR | os.O_CREAT, 0o644)
        # The map goes first: a full-length .partial without one reads as a whole plain prefix.
        write_checkpoint(fd, self._part, self._checkpoints.take(self._pieces))
        os.ftruncate(fd, self._file.size_bytes)
        return fd

    # -- pieces -----------------------------------------------------------------------------------

    async def _fetch_all(self, todo: list[int]) -> None:
        remaining = set(todo)

        async def worker() -> None:
            while remaining:
                index = min(remaining, key=self._urgency)
                remaining.discard(index)
                await self._fetch_piece(index)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self._connections, len(todo))):
                    group.create_task(worker())
        except BaseExceptionGroup as group_exc:
            raise _first(group_exc) from None

    def _urgency(self, index: int) -> tuple[int, int]:
        """Which piece a free worker takes next: one a peer holds, then one this node should fetch
        from the origin (its own share), then the rest (waiting for the peer whose share it is)."""
        start, end = self._pieces.bounds(index)
        if any(covers(held, start, end) for held, _ in self._maps.values()):
            return 0, index
        if self._complete_peers() or self._owner(index) in ("", self._me):
            return 1, index
        return 2, index

    def _live(self) -> list[BlobSource]:
        return [s for s in self._sources if s.name not in self._dead]

    def _complete_peers(self) -> list[BlobSource]:
        return [s for s in self._live() if source_kind(s.name) == "peer" and not _is_partial(s)]

    def _owner(self, index: int) -> str:
        """The swarm member whose share of the origin reads piece ``index`` is ("" with no swarm).

        Rendezvous hashing over this node and the peers still downloading: every member computes
        the same owner from the same member list, and a member joining or leaving moves only the
        pieces it wins or held, so the origin is read about once however the swarm changes.
        """
        members = [s.name for s in self._live() if _is_partial(s)]
        if not members:
            return ""
        if self._me:
            members.append(self._me)
        start = self._pieces.bounds(index)[0]
        key = f"{self._file.sha256 or self._file.filename}|{start}"
        return max(members, key=lambda m: hashlib.sha256(f"{m}|{key}".encode()).digest())

    async def _choose(self, index: int) -> BlobSource:
        """The source for the rest of piece ``index``: a peer holding it, else the origin when it is
        this node's share (or no peer is getting it), else wait for the peer whose share it is."""
        waiting_since = time.monotonic()
        while True:
            start, end = self._pieces.bounds(index)
            start += self._pieces.filled[index]
            if not self._live():
                return self._pick()  # raises, naming why each source was dropped
            whole = self._complete_peers()
            if whole:
                return min(whole, key=lambda s: self._active.get(s.name, 0))
            live = self._live()
            holding = [
                s for s in live if _is_partial(s) and covers(self._maps.get(s.name, ([], []))[0], start, end)
            ]
            if holding:
                return min(holding, key=lambda s: self._active.get(s.name, 0))
            upstream = [s for s in live if source_kind(s.name) != "peer"]
            partials = [s for s in live if _is_partial(s)]
            if not upstream and not partials:
                return self._pick()
            busy = any(overlaps(self._maps.get(s.name, ([], []))[1], start, end) for s in partials)
            patience_over = time.monotonic() - waiting_since > self._stall_s
            if upstream and (patience_over or (not busy and self._owner(index) in ("", self._me))):
                return min(upstream, key=lambda s: self._active.get(s.name, 0))
            if patience_over and not upstream:
                raise LlmlbError(
                    ErrorCode.TIMEOUT,
                    f"no peer delivered bytes {start}-{end - 1} of {self._file.filename} within "
                    f"{self._stall_s:g}s (XLLM_DOWNLOAD_STALL_TIMEOUT)",
                )
            await asyncio.sleep(SWARM_POLL_S)

    async def _settle_swarm(self) -> None:
        """Before a large file's first origin read, lets the nodes asked for it at the same moment
        see each other (each reports "downloading" to the balancer within a few hundred ms), so
        they split the origin's pieces from the start instead of each reading the same first ones."""
        if self._refresh is None or self._file.size_bytes < SWARM_MIN_BYTES or self._complete_peers():
            return
        for _ in range(SWARM_SETTLE_ROUNDS):
            await asyncio.sleep(SWARM_POLL_S)
            try:
                self._merge(await self._refresh())
            except LlmlbError as exc:
                log.info("download.swarm_refresh_failed", filename=self._file.filename, error=exc.message)
                return
        members = sorted(s.name for s in self._live() if _is_partial(s))
        if members:
            log.info("download.swarm", model_id=self._model.id, filename=self._file.filename, peers=members)

    def _held_by(self, name: str) -> list[tuple[int, int]]:
        return self._maps.get(name, ([], []))[0]

    async def _watch_swarm(self) -> None:
        """Keeps the list of peers and what the ones still downloading hold up to date."""
        assert self._refresh is not None
        refreshed = 0.0
        while True:
            if time.monotonic() - refreshed >= SWARM_REFRESH_S:
                refreshed = time.monotonic()
                try:
                    self._merge(await self._refresh())
                except LlmlbError as exc:
                    log.info("download.swarm_refresh_failed", filename=self._file.filename, error=exc.message)
            partials = [s for s in self._live() if _is_partial(s)]
            maps = await asyncio.gather(*(self._map_of(s) for s in partials))
            for source, found in zip(partials, maps, strict=True):
                if found is not None:
                    self._maps[source.name] = found
            await asyncio.sleep(SWARM_POLL_S)

    async def _map_of(self, source: BlobSource) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
        piece_map = getattr(source, "piece_map", None)
        if piece_map is None:
            return None
        try:
            async with asyncio.timeout(2.0):
                found: tuple[list[tuple[int, int]], list[tuple[int, int]]] = await piece_map(
                    self._model, self._file
                )
            self._failures[source.name] = 0
            self._not_running.pop(source.name, None)
            return found
        except (LlmlbError, TimeoutError) as exc:
            message = exc.message if isinstance(exc, LlmlbError) else "no piece map within 2s"
            if isinstance(exc, LlmlbError) and exc.code is ErrorCode.MODEL_NOT_FOUND:
                # Listed as downloading but nothing running there (yet, or any more): it holds
                # nothing for now, and only a long silence takes its share away.
                misses = self._not_running.get(source.name, 0) + 1
                self._not_running[source.name] = misses
                if misses * SWARM_POLL_S < SWARM_ABSENT_S:
                    return [], []
            else:
                failures = self._failures.get(source.name, 0) + 1
                self._failures[source.name] = failures
                if failures < ATTEMPTS_PER_SOURCE:
                    return None
            self._dead.setdefault(source.name, message)  # left the swarm: its share moves on
            log.info("download.peer_left", filename=self._file.filename, peer=source.name, error=message)
            return None

    def _merge(self, found: list[BlobSource]) -> None:
        """Adds peers that joined, and turns a peer that finished into a whole-file source."""
        known = {s.name: i for i, s in enumerate(self._sources)}
        for source in found:
            if source.name == self._me:
                continue
            at = known.get(source.name)
            if at is None:
                # Before the origin: the list is peers first, and _pick keeps that order.
                self._sources.insert(0, source)
                known = {s.name: i for i, s in enumerate(self._sources)}
            elif _is_partial(self._sources[at]) and not _is_partial(source):
                self._sources[at] = source
                self._maps.pop(source.name, None)

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
            source = await self._choose(index)
            before = self._pieces.filled[index]
            try:
                await self._read_piece(source, index)
                self._failures[source.name] = 0
            except LlmlbError as exc:
                if exc.code is ErrorCode.DOWNLOAD_FAILED and self._pieces.filled[index] > before:
                    # A connection that delivered bytes before it dropped: a resume, not a strike
                    # against the source (several pieces in flight would otherwise use up its
                    # attempts at once). A stall stays a strike: a source that keeps stalling is let go.
                    self._failures[source.name] = 0
                if exc.code is ErrorCode.INSUFFICIENT_STORAGE:
                    raise
                if time.monotonic() >= self._deadline:
                    raise LlmlbError(
                        ErrorCode.DOWNLOAD_FAILED,
                        f"download of {self._file.filename} took longer than the total timeout "
                        "(XLLM_DOWNLOAD_TIMEOUT)",
                    ) from None
                if exc.code in (ErrorCode.UNAVAILABLE, ErrorCode.MODEL_NOT_FOUND) and _is_partial(source):
                    # A peer still downloading did not hold the range after all (or is between its
                    # download and the whole file): ask again later; its piece map says if it left.
                    self._maps.pop(source.name, None)
                    await asyncio.sleep(SWARM_POLL_S)
                    continue
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
        self._reading.add(index)
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
            self._checkpoint_if_due()

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
            self._reading.discard(index)

    async def _piece_done(self) -> None:
        self._checkpoint_if_due()
        if self._hashing is None or self._hashing.done():
            self._hashing = asyncio.create_task(self._hash_prefix())

    # -- checkpoints (the sidecar) ----------------------------------------------------------------

    def _checkpoint_if_due(self) -> None:
        """After bytes arrive: starts the checkpointer, or wakes it when a checkpoint is due now."""
        if self._checkpointing is None or self._checkpointing.done():
            if self._checkpoints.next_in(self._pieces) is not None:
                self._checkpointing = asyncio.create_task(self._checkpoint())
        elif self._checkpoints.due(self._pieces):
            self._checkpoint_now.set()

    async def _checkpoint(self) -> None:
        """Runs while bytes are unsaved, one checkpoint at a time (a slow disk batches more bytes
        into each sync instead of queueing syncs), so even a stalled source's last bytes are saved."""
        while not self._checkpoints_stopped and (wait := self._checkpoints.next_in(self._pieces)) is not None:
            if wait > 0:
                self._checkpoint_now.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._checkpoint_now.wait()
                continue
            # Copied here, on the loop that fills the map: it claims only bytes already written.
            await self._write_checkpoint(self._checkpoints.take(self._pieces))

    async def _write_checkpoint(self, snapshot: PieceMap) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._io, write_checkpoint, self._fd, self._part, snapshot)
        except OSError as exc:  # the bytes stay written; the sidecar keeps its older, smaller claim
            log.warning("download.checkpoint_failed", filename=self._file.filename, error=repr(exc))

    async def _stop_checkpoint(self) -> None:
        """Ends the checkpointer, waiting out a sync in flight: it must not meet a closed (or reused) fd."""
        self._checkpoints_stopped = True
        self._checkpoint_now.set()
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)

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


def _is_partial(source: BlobSource) -> bool:
    return bool(getattr(source, "partial", False))


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
