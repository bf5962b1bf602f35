"""The node's models dir and downloader on real files, with in-memory byte sources."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

import node.downloader
import node.transfer
from common.config import NodeConfig, load_node_config
from common.errors import ErrorCode, LlmlbError
from common.logs import configure_logging
from common.secret import Secret
from common.types import FileFormat, ManifestFile, Model, ModelSource
from node.downloader import DISK_RESERVE_BYTES, Downloader, Progress
from node.storage import Storage, Verifier, partial_path

DATA = bytes(range(256)) * 4096  # 1 MiB


def manifest_file(data: bytes = DATA, name: str = "w.gguf", sha: str | None = None) -> ManifestFile:
    return ManifestFile(
        name, FileFormat.GGUF, len(data), hashlib.sha256(data).hexdigest() if sha is None else sha
    )


def model(*files: ManifestFile, model_id: str = "acme/m") -> Model:
    return Model(model_id, model_id, ModelSource.HF, model_id, "abc", "http://127.0.0.1:9", files=list(files))


@pytest.fixture
def io_threads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


class MemorySource:
    """Serves ``data`` from any offset; can stop after a number of bytes or stall, or pace its chunks.

    ``most_open`` is the largest number of its streams that were open at one time.
    """

    name = "memory"

    def __init__(
        self,
        data: bytes,
        *,
        stall_after: int | None = None,
        chunk: int = 64 * 1024,
        delay: float = 0.0,
    ) -> None:
        self.data = data
        self.stall_after = stall_after
        self.chunk = chunk
        self.delay = delay
        self.offsets: list[int] = []
        self.open = 0
        self.most_open = 0

    async def stream(
        self, model: Model, file: ManifestFile, offset: int, length: int = 0
    ) -> AsyncIterator[bytes]:
        self.offsets.append(offset)
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            sent = 0
            for start in range(offset, len(self.data), self.chunk):
                if self.stall_after is not None and sent >= self.stall_after:
                    await asyncio.sleep(3600)
                if self.delay:
                    await asyncio.sleep(self.delay)
                piece = self.data[start : start + self.chunk]
                sent += len(piece)
                yield piece
        finally:
            self.open -= 1


def node_config(tmp_path: Path, **env: str) -> NodeConfig:
    return load_node_config(models_dir=tmp_path / "models", home=tmp_path, env=env)


async def test_a_verified_file_is_not_hashed_again_after_a_restart(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    storage = Storage(tmp_path, io_threads)
    f = manifest_file()
    path = storage.file_path("acme/m", f.filename)
    path.parent.mkdir(parents=True)
    path.write_bytes(DATA)
    assert await storage.is_valid("acme/m", f)
    assert storage.marker_path("acme/m", f.filename).exists()

    # Same size and mtime, other bytes: a fresh process trusts the marker instead of re-hashing...
    st = path.stat()
    path.write_bytes(bytes(len(DATA)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert await Storage(tmp_path, io_threads).is_valid("acme/m", f)
    # ...while a file whose mtime moved is hashed again, and found wrong.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert not await Storage(tmp_path, io_threads).is_valid("acme/m", f)


async def test_a_file_is_valid_only_when_non_empty_and_of_the_manifests_size(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    verifier = Verifier(io_threads)
    path = tmp_path / "f"
    assert not await verifier.matches(path, manifest_file())  # missing
    path.write_bytes(b"")
    assert not await verifier.matches(path, manifest_file(b""))  # empty
    path.write_bytes(DATA[:-1])
    assert not await verifier.matches(path, manifest_file())  # short
    path.write_bytes(DATA)
    assert await verifier.matches(path, manifest_file(sha=""))  # no published digest: size decides


async def test_deleting_a_model_leaves_a_model_nested_under_it_alone(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    storage = Storage(tmp_path, io_threads)
    outer, inner = model(manifest_file(), model_id="acme/m"), model(manifest_file(), model_id="acme/m/q4")
    for m in (outer, inner):
        path = storage.file_path(m.id, "w.gguf")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(DATA)
        storage.save_manifest(m)
    assert {m.id for m in storage.known_models()} == {"acme/m", "acme/m/q4"}
    freed = await storage.delete("acme/m")
    assert freed >= len(DATA)
    assert not storage.file_path("acme/m", "w.gguf").exists()
    assert storage.file_path("acme/m/q4", "w.gguf").read_bytes() == DATA
    assert [m.id for m in storage.known_models()] == ["acme/m/q4"]
    await storage.delete("acme/m/q4")
    assert os.listdir(tmp_path) == []


def test_file_names_cannot_leave_the_model_folder(tmp_path: Path, io_threads: ThreadPoolExecutor) -> None:
    storage = Storage(tmp_path, io_threads)
    for bad in ("../x", "a/../../x", "/etc/passwd", ".llmlb/manifest.json", ""):
        with pytest.raises(LlmlbError):
            storage.file_path("acme/m", bad)
    with pytest.raises(LlmlbError) as err:
        storage.file_path("../escape", "w.gguf")
    assert err.value.code is ErrorCode.INVALID_MODEL_ID


async def test_a_download_resumes_from_the_partial_files_last_byte(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    config = node_config(tmp_path)
    storage = Storage(config.models_dir, io_threads)
    f = manifest_file()
    part = storage.file_path("acme/m", f.filename).with_name("w.gguf.partial")
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA[:300_000])
    seen: list[Progress] = []
    source = MemorySource(DATA)
    path = await Downloader(storage, config, seen.append).fetch(model(f), f, [source])
    assert path.read_bytes() == DATA
    assert source.offsets == [300_000]
    assert not part.exists()
    assert seen[-1].done == len(DATA) and seen[0].done > 300_000


async def test_a_stalled_source_fails_with_a_clear_error_and_keeps_the_bytes_so_far(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    config = node_config(tmp_path, XLLM_DOWNLOAD_STALL_TIMEOUT="0.2")
    storage = Storage(config.models_dir, io_threads)
    f = manifest_file()
    with pytest.raises(LlmlbError) as err:
        await Downloader(storage, config).fetch(model(f), f, [MemorySource(DATA, stall_after=200_000)])
    assert err.value.code is ErrorCode.DOWNLOAD_FAILED
    assert "XLLM_DOWNLOAD_STALL_TIMEOUT" in err.value.message
    assert not storage.file_path("acme/m", f.filename).exists()
    assert storage.partial_bytes("acme/m", f.filename) >= 200_000  # the next attempt resumes from here


async def test_a_download_that_cannot_fit_on_the_disk_is_refused_before_a_byte_is_written(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    config = node_config(tmp_path)
    storage = Storage(config.models_dir, io_threads)
    huge = ManifestFile("huge.gguf", FileFormat.GGUF, 1 << 60, "0" * 64)
    with pytest.raises(LlmlbError) as err:
        await Downloader(storage, config).fetch(model(huge), huge, [MemorySource(DATA)])
    assert err.value.code is ErrorCode.INSUFFICIENT_STORAGE
    assert "insufficient storage" in err.value.message
    bookkeeping = {".llmlb", ".locks"}
    assert not [p for p in config.models_dir.rglob("*") if p.is_file() and not bookkeeping & set(p.parts)]


async def test_progress_is_logged_at_each_tenth_of_the_file_and_ends_at_100_percent(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    config = node_config(tmp_path)
    storage = Storage(config.models_dir, io_threads)
    data = DATA[:100_003]  # not a multiple of ten: the last tenth ends on the file's last byte
    f = manifest_file(data)
    with capture_logs() as events:
        await Downloader(storage, config).fetch(model(f), f, [MemorySource(data, chunk=1000)])
    progress = [e for e in events if e["event"] == "download.progress"]
    assert [e["percent"] for e in progress] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    done = [e["bytes"] for e in progress]
    assert done == sorted(set(done)) and done[-1] == len(data)
    assert {(e["model_id"], e["filename"]) for e in progress} == {("acme/m", "w.gguf")}

    # A resumed download logs only the tenths it has still to reach.
    r = manifest_file(data, name="r.gguf")
    part = partial_path(storage.file_path("acme/m", r.filename))
    part.write_bytes(data[:35_000])
    with capture_logs() as events:
        await Downloader(storage, config).fetch(model(r), r, [MemorySource(data, chunk=1000)])
    assert [e["percent"] for e in events if e["event"] == "download.progress"] == [
        40,
        50,
        60,
        70,
        80,
        90,
        100,
    ]


@pytest.mark.parametrize("max_downloads", [1, 2])
async def test_a_node_transfers_at_most_max_downloads_files_at_a_time(
    tmp_path: Path, io_threads: ThreadPoolExecutor, max_downloads: int
) -> None:
    env = {} if max_downloads == 1 else {"XLLM_MAX_DOWNLOADS": str(max_downloads)}  # 1 is the default
    config = node_config(tmp_path, **env)
    assert config.max_downloads == max_downloads
    storage = Storage(config.models_dir, io_threads)
    downloader = Downloader(storage, config)
    a, b = manifest_file(name="a.gguf"), manifest_file(name="b.gguf")
    other = manifest_file(name="o.gguf")
    source = MemorySource(DATA, delay=0.01)  # one origin for all: 16 paced chunks a file
    paths = await asyncio.gather(
        downloader.fetch(model(a, b), a, [source]),
        downloader.fetch(model(a, b), b, [source]),
        downloader.fetch(model(other, model_id="acme/other"), other, [source]),
    )
    assert [p.read_bytes() == DATA for p in paths] == [True, True, True]
    assert sorted(source.offsets) == [0, 0, 0]
    assert source.most_open == max_downloads  # 1: one after the other; 2: two overlapped


async def test_a_download_slower_than_the_total_timeout_fails_naming_it_and_keeps_its_bytes(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    config = node_config(tmp_path, XLLM_DOWNLOAD_TIMEOUT="0.5")
    storage = Storage(config.models_dir, io_threads)
    f = manifest_file()
    slow = MemorySource(DATA, delay=0.1)  # never stalled (a chunk each 0.1 s) but 1.6 s for the file
    started = time.monotonic()
    with pytest.raises(LlmlbError) as err:
        await Downloader(storage, config).fetch(model(f), f, [slow])
    took = time.monotonic() - started
    assert err.value.code is ErrorCode.DOWNLOAD_FAILED
    assert "XLLM_DOWNLOAD_TIMEOUT" in err.value.message and f.filename in err.value.message
    assert took < 1.2  # it gave up at the deadline instead of waiting for the whole file
    assert slow.offsets == [0]  # past the deadline nothing is retried
    assert not storage.file_path("acme/m", f.filename).exists()
    kept = storage.partial_bytes("acme/m", f.filename)
    assert 0 < kept < len(DATA)

    fast = MemorySource(DATA)
    path = await Downloader(storage, node_config(tmp_path)).fetch(model(f), f, [fast])
    assert path.read_bytes() == DATA
    assert fast.offsets == [kept]  # the next attempt resumed from the bytes kept


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


async def test_a_download_waits_for_another_process_holding_the_file_and_goes_on_when_it_is_killed(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    config = node_config(tmp_path)
    storage = Storage(config.models_dir, io_threads)
    f = manifest_file()
    lock = storage.lock_path("acme/m", f.filename)
    lock.parent.mkdir(parents=True)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_LOCK, str(lock), stdout=asyncio.subprocess.PIPE
    )
    source = MemorySource(DATA)
    fetch: asyncio.Task[Path] | None = None
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 10) == b"locked\n"
        fetch = asyncio.create_task(Downloader(storage, config).fetch(model(f), f, [source]))
        await asyncio.sleep(0.5)
        assert not fetch.done()  # it waits for the other process...
        assert source.offsets == [] and storage.partial_bytes("acme/m", f.filename) == 0  # ...idle

        holder.kill()  # SIGKILL: the holder never unlocks, the kernel drops its lock
        await holder.wait()
        path = await asyncio.wait_for(fetch, 10)
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        if fetch is not None and not fetch.done():
            fetch.cancel()
    assert path.read_bytes() == DATA
    assert source.offsets == [0]
    assert await Storage(config.models_dir, io_threads).is_valid("acme/m", f)


async def test_a_disk_that_fills_mid_download_fails_as_insufficient_storage_and_leaves_no_file(
    tmp_path: Path, io_threads: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = node_config(tmp_path)
    storage = Storage(config.models_dir, io_threads)
    f = manifest_file()
    write = node.transfer._pwrite
    written = 0

    def write_until_full(fd: int, chunk: memoryview, position: int) -> int:
        nonlocal written
        if written + len(chunk) > 300_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = write(fd, chunk, position)
        written += n
        return n

    monkeypatch.setattr(node.transfer, "_pwrite", write_until_full)
    first, second = MemorySource(DATA), MemorySource(DATA)
    with pytest.raises(LlmlbError) as err:
        await Downloader(storage, config).fetch(model(f), f, [first, second])
    assert err.value.code is ErrorCode.INSUFFICIENT_STORAGE
    assert "insufficient storage" in err.value.message and f.filename in err.value.message
    assert written > 0  # the disk filled partway, after the check before the first byte
    assert first.offsets == [0] and second.offsets == []  # a full disk is no source's fault
    assert not storage.file_path("acme/m", f.filename).exists()
    # As the downloader promises: nothing half-written stays behind to hold the space.
    assert not partial_path(storage.file_path("acme/m", f.filename)).exists()


def test_room_is_checked_for_the_whole_model_counting_what_partial_files_already_hold(
    tmp_path: Path, io_threads: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = node_config(tmp_path)
    storage = Storage(config.models_dir, io_threads)
    downloader = Downloader(storage, config)
    a, b = manifest_file(name="a.gguf"), manifest_file(name="b.gguf")  # 1 MiB each
    free = DISK_RESERVE_BYTES + len(DATA) + len(DATA) // 2  # room for one and a half files
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=free))
    downloader.check_room("acme/m", [a])  # either file alone fits
    with pytest.raises(LlmlbError) as err:
        downloader.check_room("acme/m", [a, b])  # both together do not
    assert err.value.code is ErrorCode.INSUFFICIENT_STORAGE
    assert "a.gguf, b.gguf" in err.value.message
    assert not storage.model_dir("acme/m").exists()  # asking made no folder
    part = partial_path(storage.file_path("acme/m", "b.gguf"))
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA[: len(DATA) // 2])
    downloader.check_room("acme/m", [a, b])  # half of b is already here: what is left fits


def test_node_config_takes_flags_over_environment_over_the_env_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("XLLM_MAX_DOWNLOADS=3\nXLLM_DOWNLOAD_VIA=balancer\nHF_TOKEN=from-file\n")
    env = {"XLLM_MAX_DOWNLOADS": "2", "XLLM_SHARED_DIR": "/mnt/models"}
    config = load_node_config(home=tmp_path, env=env, download_via="origin")
    assert config.max_downloads == 2
    assert config.download_via == "origin"
    assert config.shared_dir == Path("/mnt/models")
    assert config.hf_token == Secret("from-file")
    assert config.download_timeout_s == 300.0
    for bad in (
        {"XLLM_MAX_DOWNLOADS": "0"},
        {"XLLM_DOWNLOAD_VIA": "carrier-pigeon"},
        {"XLLM_BACKEND": "tpu"},
    ):
        with pytest.raises(ValueError):
            load_node_config(home=tmp_path, env=bad)


async def test_the_console_log_reads_download_progress_as_a_sentence_beside_its_fields(
    tmp_path: Path, io_threads: ThreadPoolExecutor, capsys: pytest.CaptureFixture[str]
) -> None:
    config = node_config(tmp_path)
    storage = Storage(config.models_dir, io_threads)
    f = manifest_file(DATA)
    root = logging.getLogger()
    handlers, level, saved = root.handlers[:], root.level, structlog.get_config()
    configure_logging("console", "info")
    try:
        await Downloader(storage, config).fetch(model(f), f, [MemorySource(DATA, chunk=4096)])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**saved)
    lines = [line for line in capsys.readouterr().err.splitlines() if "download.progress" in line]
    assert re.search(r"Download progress: 10% \(1\d\d kB / 1.05 MB\)", lines[0])
    assert "Download progress: 100% (1.05 MB / 1.05 MB)" in lines[-1]
    assert "model_id=acme/m" in lines[0] and "percent=10" in lines[0]  # the fields stay


def test_download_locks_live_under_the_models_dirs_locks_folder(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    storage = Storage(tmp_path / "models", io_threads)
    assert storage.lock_path("acme/m", "w.gguf") == storage.root / ".locks" / "acme" / "m" / "w.gguf.lock"
    for reserved in (".locks", ".llmlb/x"):
        with pytest.raises(LlmlbError) as err:
            storage.model_dir(reserved)
        assert err.value.code is ErrorCode.INVALID_MODEL_ID
