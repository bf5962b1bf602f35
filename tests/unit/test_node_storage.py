"""The node's models dir and downloader on real files, with in-memory byte sources."""

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
from common.errors import ErrorCode, LlmlbError
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
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


class MemorySource:
    """Serves ``data`` from any offset; can stop after a number of bytes or stall."""

    name = "memory"

    def __init__(self, data: bytes, *, stall_after: int | None = None, chunk: int = 64 * 1024) -> None:
        self.data = data
        self.stall_after = stall_after
        self.chunk = chunk
        self.offsets: list[int] = []

    async def stream(self, model: Model, file: ManifestFile, offset: int) -> AsyncIterator[bytes]:
        self.offsets.append(offset)
        sent = 0
        for start in range(offset, len(self.data), self.chunk):
            if self.stall_after is not None and sent >= self.stall_after:
                await asyncio.sleep(3600)
            piece = self.data[start : start + self.chunk]
            sent += len(piece)
            yield piece


def node_config(tmp_path: Path, **env: str) -> NodeConfig:
    return load_node_config(models_dir=tmp_path / "models", home=tmp_path, env=env)


async def test_a_verified_file_is_not_hashed_again_after_a_restart(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    storage = Storage(tmp_path, pool)
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
    assert await Storage(tmp_path, pool).is_valid("acme/m", f)
    # ...while a file whose mtime moved is hashed again, and found wrong.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert not await Storage(tmp_path, pool).is_valid("acme/m", f)


async def test_a_file_is_valid_only_when_non_empty_and_of_the_manifests_size(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    verifier = Verifier(pool)
    path = tmp_path / "f"
    assert not await verifier.matches(path, manifest_file())  # missing
    path.write_bytes(b"")
    assert not await verifier.matches(path, manifest_file(b""))  # empty
    path.write_bytes(DATA[:-1])
    assert not await verifier.matches(path, manifest_file())  # short
    path.write_bytes(DATA)
    assert await verifier.matches(path, manifest_file(sha=""))  # no published digest: size decides


async def test_deleting_a_model_leaves_a_model_nested_under_it_alone(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    storage = Storage(tmp_path, pool)
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


def test_file_names_cannot_leave_the_model_folder(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    storage = Storage(tmp_path, pool)
    for bad in ("../x", "a/../../x", "/etc/passwd", ".llmlb/manifest.json", ""):
        with pytest.raises(LlmlbError):
            storage.file_path("acme/m", bad)
    with pytest.raises(LlmlbError) as err:
        storage.file_path("../escape", "w.gguf")
    assert err.value.code is ErrorCode.INVALID_MODEL_ID


async def test_a_download_resumes_from_the_partial_files_last_byte(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    config = node_config(tmp_path)
    storage = Storage(config.models_dir, pool)
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
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    config = node_config(tmp_path, XLLM_DOWNLOAD_STALL_TIMEOUT="0.2")
    storage = Storage(config.models_dir, pool)
    f = manifest_file()
    with pytest.raises(LlmlbError) as err:
        await Downloader(storage, config).fetch(model(f), f, [MemorySource(DATA, stall_after=200_000)])
    assert err.value.code is ErrorCode.DOWNLOAD_FAILED
    assert "XLLM_DOWNLOAD_STALL_TIMEOUT" in err.value.message
    assert not storage.file_path("acme/m", f.filename).exists()
    assert storage.partial_bytes("acme/m", f.filename) >= 200_000  # the next attempt resumes from here


async def test_a_download_that_cannot_fit_on_the_disk_is_refused_before_a_byte_is_written(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    config = node_config(tmp_path)
    storage = Storage(config.models_dir, pool)
    huge = ManifestFile("huge.gguf", FileFormat.GGUF, 1 << 60, "0" * 64)
    with pytest.raises(LlmlbError) as err:
        await Downloader(storage, config).fetch(model(huge), huge, [MemorySource(DATA)])
    assert err.value.code is ErrorCode.INSUFFICIENT_STORAGE
    assert "insufficient storage" in err.value.message
    assert not [p for p in config.models_dir.rglob("*") if p.is_file() and ".llmlb" not in p.parts]


def test_room_is_checked_for_the_whole_model_counting_what_partial_files_already_hold(
    tmp_path: Path, pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = node_config(tmp_path)
    storage = Storage(config.models_dir, pool)
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
    assert config.hf_token == "from-file"
    assert config.download_timeout_s == 300.0
    for bad in (
        {"XLLM_MAX_DOWNLOADS": "0"},
        {"XLLM_DOWNLOAD_VIA": "carrier-pigeon"},
        {"XLLM_BACKEND": "tpu"},
    ):
        with pytest.raises(ValueError):
            load_node_config(home=tmp_path, env=bad)
