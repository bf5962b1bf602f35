"""Fetching one manifest file into the models dir: resumable, verified, atomic, shared, bounded.

The bytes go to ``<file>.partial`` in pieces fetched at once (``node/transfer.py``); only a file
whose size and sha256 match the manifest is renamed into place, so a reader never sees half a file.
A killed node leaves its ``.partial`` behind and the next attempt continues each piece from where
its sidecar's last checkpoint says it stopped (``node/pieces.py``).

Sharing: callers asking for the same file in one process wait on one task; node processes sharing a
models dir take an exclusive ``flock`` on the file's lock file, which the kernel releases when the
holder dies (even on SIGKILL), so a crashed holder never blocks the others.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

from common.config import NodeConfig
from common.errors import ErrorCode, LlmlbError
from common.metrics import NodeMetrics
from common.types import ManifestFile, Model
from node.blob_sources import BlobSource
from node.pieces import discard_sidecar
from node.storage import Storage, partial_path
from node.transfer import RangedTransfer

log = structlog.get_logger(__name__)

# Kept free beyond the file itself, so a download never fills the disk to the last block.
DISK_RESERVE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Progress:
    model_id: str
    filename: str
    done: int
    total: int


class FileLock:
    """An exclusive ``flock`` held across node processes; waiting polls, so the event loop stays free."""

    def __init__(self, path: Path, poll_s: float = 0.1, on_wait: Callable[[], None] | None = None) -> None:
        self.path = path
        self._poll_s = poll_s
        self._on_wait = on_wait
        self._fd: int | None = None

    async def __aenter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._on_wait is not None:
                        self._on_wait()
                    await asyncio.sleep(self._poll_s)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for an operator looking
        self._fd = fd
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Downloader:
    """Downloads manifest files; at most ``max_downloads`` at a time, one transfer per file."""

    def __init__(
        self,
        storage: Storage,
        config: NodeConfig,
        on_progress: Callable[[Progress], None] | None = None,
        *,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self._storage = storage
        self._config = config
        self.on_progress: Callable[[Progress], None] = on_progress or (lambda p: None)
        self._metrics = metrics or NodeMetrics(dict)
        self._slots = asyncio.Semaphore(config.max_downloads)
        self._inflight: dict[Path, asyncio.Task[None]] = {}
        self._transfers: dict[tuple[str, str], RangedTransfer] = {}  # (model id, filename) -> running

    def partial(self, model_id: str, filename: str) -> RangedTransfer | None:
        """The download of ``model_id``/``filename`` running now, for peers reading what it holds."""
        return self._transfers.get((model_id, filename))

    def active(self) -> int:
        return len(self._inflight)

    async def fetch(
        self,
        model: Model,
        file: ManifestFile,
        sources: list[BlobSource],
        *,
        refresh: Callable[[], Awaitable[list[BlobSource]]] | None = None,
        me: str = "",
    ) -> Path:
        """Makes ``file`` valid in the models dir and returns its path; raises ``download_failed``.

        ``refresh`` asks again who holds or is fetching the file (the swarm, see ``node/transfer.py``)
        and ``me`` is this node's name among those peers.
        """
        path = self._storage.file_path(model.id, file.filename)
        task = self._inflight.get(path)
        if task is None:
            task = asyncio.create_task(self._fetch_shared(model, file, sources, refresh, me))
            self._inflight[path] = task
            task.add_done_callback(
                lambda t: self._inflight.pop(path, None) if self._inflight.get(path) is t else None
            )
        # A caller that goes away does not cancel the download the others wait on.
        await asyncio.shield(task)
        return path

    def check_room(self, model_id: str, files: Sequence[ManifestFile]) -> None:
        """Raises ``insufficient_storage`` unless the files' missing bytes fit, with a reserve to spare.

        Called for the whole model before its state says "downloading", and again per file.
        """
        need = sum(max(0, f.size_bytes - self._storage.partial_bytes(model_id, f.filename)) for f in files)
        where = self._storage.model_dir(model_id)
        while not where.exists() and where != where.parent:
            where = where.parent  # the model's folder is made only once a download starts
        free = shutil.disk_usage(where).free
        if free < need + DISK_RESERVE_BYTES:
            names = ", ".join(f.filename for f in files)
            raise LlmlbError(
                ErrorCode.INSUFFICIENT_STORAGE,
                f"insufficient storage for {model_id} ({names}): needs {need} bytes "
                f"(+{DISK_RESERVE_BYTES} reserve), {free} free in {where}",
            )

    async def cancel_model(self, model_id: str) -> None:
        """Stops the model's downloads in flight (the model is being deleted)."""
        folder = self._storage.model_dir(model_id)
        tasks = [t for p, t in self._inflight.items() if folder in p.parents]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch_shared(
        self,
        model: Model,
        file: ManifestFile,
        sources: list[BlobSource],
        refresh: Callable[[], Awaitable[list[BlobSource]]] | None,
        me: str,
    ) -> None:
        def waiting() -> None:  # another process holds the lock: report what its .partial holds
            done = self._storage.partial_bytes(model.id, file.filename)
            self.on_progress(Progress(model.id, file.filename, done, file.size_bytes))

        lock = FileLock(self._storage.lock_path(model.id, file.filename), on_wait=waiting)
        async with lock:
            if await self._storage.is_valid(model.id, file):
                return  # another node process on this models dir finished it while we waited
            async with self._slots:
                await self._download(model, file, sources, refresh, me)

    async def _download(
        self,
        model: Model,
        file: ManifestFile,
        sources: list[BlobSource],
        refresh: Callable[[], Awaitable[list[BlobSource]]] | None,
        me: str,
    ) -> None:
        """One file's download, counted in ``xllm_downloads_total`` by its outcome."""
        outcome = "ok"
        try:
            await self._download_file(model, file, sources, refresh, me)
        except LlmlbError as exc:
            outcome = exc.code.value
            raise
        except asyncio.CancelledError:
            outcome = ErrorCode.CANCELLED.value
            raise
        except Exception:
            outcome = ErrorCode.INTERNAL.value
            raise
        finally:
            self._metrics.downloads.labels(outcome).inc()

    async def _download_file(
        self,
        model: Model,
        file: ManifestFile,
        sources: list[BlobSource],
        refresh: Callable[[], Awaitable[list[BlobSource]]] | None,
        me: str,
    ) -> None:
        path = self._storage.file_path(model.id, file.filename)
        part = partial_path(path)
        part.parent.mkdir(parents=True, exist_ok=True)
        have = self._storage.partial_bytes(model.id, file.filename)
        self.check_room(model.id, [file])
        if not sources:
            raise LlmlbError(ErrorCode.DOWNLOAD_FAILED, f"no source to download {file.filename} from")
        started = time.monotonic()
        log.info(
            "download.start",
            model_id=model.id,
            filename=file.filename,
            bytes=file.size_bytes,
            resume_from=have,
            sources={s.name: getattr(s, "via", "stream") for s in sources},  # name -> wire path
            connections=self._config.download_connections,
            piece_mb=self._config.download_piece_mb,
        )
        next_log = _next_decile(have, file.size_bytes)

        def progressed(done: int, by_source: dict[str, int]) -> None:
            nonlocal next_log
            self.on_progress(Progress(model.id, file.filename, done, file.size_bytes))
            if done >= next_log:
                log.info(
                    "download.progress",
                    model_id=model.id,
                    filename=file.filename,
                    percent=int(100 * done / file.size_bytes),
                    bytes=done,
                    total_bytes=file.size_bytes,
                    by_source=dict(by_source),
                )
                next_log = _next_decile(done, file.size_bytes)

        transfer = RangedTransfer(
            model,
            file,
            part,
            sources,
            connections=self._config.download_connections,
            piece_bytes=self._config.download_piece_mb * 1024 * 1024,
            stall_s=self._config.download_stall_timeout_s,
            deadline=started + self._config.download_timeout_s,
            io_threads=self._storage.io_threads,
            metrics=self._metrics,
            on_done=progressed,
            me=me,
            refresh=refresh,
        )
        key = (model.id, file.filename)
        self._transfers[key] = transfer  # peers may read what it holds while it runs
        loop = asyncio.get_running_loop()
        try:
            digest = await transfer.run()
            fetched = time.monotonic()
            await loop.run_in_executor(self._storage.io_threads, _publish, part, path)
        finally:
            # Only once the whole file is in place: a peer reading never finds neither.
            self._transfers.pop(key, None)
        self._storage.record_verified(model.id, file.filename, digest)
        # The transfer's own time (verification and rename included, process start-up not):
        # what an operator compares between sources, and what the transfer bench reads.
        seconds = time.monotonic() - started
        log.info(
            "download.done",
            model_id=model.id,
            filename=file.filename,
            bytes=file.size_bytes,
            by_source=transfer.by_source,
            seconds=round(seconds, 4),
            # Of those, the fsync before the rename: the disk's share, apart from the network's.
            sync_s=round(time.monotonic() - fetched, 4),
            mib_per_s=round((file.size_bytes - have) / 2**20 / max(seconds, 1e-9), 1),
        )


def _next_decile(done: int, total: int) -> int:
    """The byte count that reaches the next whole 10 % of ``total``; the last one is ``total`` itself."""
    if total <= 0:
        return 1
    tenths = 10 * done // total + 1
    # Rounded up, so each step logs at 10k % or just past it (never 9.99 %) and the last at 100 %.
    return -(-tenths * total // 10)


def _publish(part: Path, path: Path) -> None:
    with part.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(part, path)  # atomic: readers see the old file or the whole new one
    discard_sidecar(part)
