"""Models placed by hand: which folders are found, with what id and files, and hashed only once."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from common.types import Capability, FileFormat, ModelSource
from node.local_models import LocalModels
from node.storage import Storage

OLD = time.time() - 3600
GGUF = b"GGUF" + bytes(range(200))


@pytest.fixture
def io_threads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def place(folder: Path, files: dict[str, bytes], *, settled: bool = True) -> None:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if settled:
            os.utime(path, (OLD, OLD))


def finder(tmp_path: Path, io_threads: ThreadPoolExecutor, shared: Path | None = None) -> LocalModels:
    return LocalModels(Storage(tmp_path / "models", io_threads), shared, interval_s=0)


async def test_a_gguf_copied_into_a_folder_is_a_local_model_named_by_the_folder(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    place(tmp_path / "models" / "llama-3.2-1b", {"model.gguf": GGUF, "README.md": b"# docs"})
    found = finder(tmp_path, io_threads)
    heard: list[list[str]] = []
    found.subscribe(lambda models: heard.append([m.id for m in models]))
    assert await found.scan()
    [model] = found.models()
    assert (model.id, model.source) == ("llama-3.2-1b", ModelSource.LOCAL)
    assert [(f.filename, f.format, f.size_bytes) for f in model.files] == [
        ("model.gguf", FileFormat.GGUF, len(GGUF))
    ]
    assert model.files[0].sha256 == hashlib.sha256(GGUF).hexdigest()
    assert Capability.CHAT in model.capabilities
    assert heard == [["llama-3.2-1b"]]
    assert not await found.scan()  # nothing changed: nobody is told again


async def test_a_safetensors_folder_lists_its_config_and_tokenizer_and_nested_ids_work(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    files = {"model.safetensors": b"st", "config.json": b"{}", "tokenizer.json": b"{}", "LICENSE": b"x"}
    place(tmp_path / "models" / "acme" / "tiny", files)
    found = finder(tmp_path, io_threads)
    await found.scan()
    [model] = found.models()
    assert model.id == "acme/tiny"
    assert {f.filename: f.format for f in model.files} == {
        "config.json": FileFormat.CONFIG,
        "model.safetensors": FileFormat.SAFETENSORS,
        "tokenizer.json": FileFormat.CONFIG,
    }


async def test_bad_names_fetched_models_bookkeeping_and_copies_in_progress_are_not_local_models(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    models = tmp_path / "models"
    place(models / "Bad Name!", {"model.gguf": GGUF})
    place(models / "UPPER", {"model.gguf": GGUF})  # ids are lower-case: the folder must be too
    place(models / "fetched", {"w.gguf": GGUF, ".llmlb/manifest.json": json.dumps({"source": "hf"}).encode()})
    place(models / "downloading", {"w.gguf.partial": GGUF})
    place(models / ".locks" / "x", {"w.gguf": GGUF})
    place(models / "copying", {"model.gguf": GGUF}, settled=False)
    found = finder(tmp_path, io_threads)
    with capture_logs() as events:
        await found.scan()
        await found.scan()
    assert found.models() == []
    bad = [e["path"] for e in events if e["event"] == "local_model.bad_id"]
    assert sorted(Path(p).name for p in bad) == ["Bad Name!", "UPPER"]  # each logged once


async def test_the_models_dir_wins_over_the_shared_dir_and_a_restart_hashes_nothing_again(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    shared = tmp_path / "shared"
    place(tmp_path / "models" / "m", {"model.gguf": GGUF})
    place(shared / "m", {"model.gguf": GGUF + b"shared"})
    place(shared / "s", {"model.gguf": GGUF + b"only on the share"})
    found = finder(tmp_path, io_threads, shared)
    await found.scan()
    m, s = found.get("m"), found.get("s")
    assert m is not None and s is not None
    assert (m.kind, s.kind) == ("models", "shared")
    with capture_logs() as events:
        again = finder(tmp_path, io_threads, shared)  # a restarted node
        await again.scan()
    assert [model.files for model in again.models()] == [model.files for model in found.models()]
    assert not [e for e in events if e["event"] == "file.hashing"]


async def test_a_changed_file_is_hashed_again_when_its_folder_is_refreshed(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    shared = tmp_path / "shared"
    place(shared / "m", {"model.gguf": GGUF})
    found = finder(tmp_path, io_threads, shared)
    await found.scan()
    place(shared / "m", {"model.gguf": GGUF + b"v2"})
    os.utime(shared / "m" / "model.gguf", (OLD + 60, OLD + 60))
    refreshed = await found.refresh("m")
    assert refreshed is not None
    assert refreshed.model.files[0].sha256 == hashlib.sha256(GGUF + b"v2").hexdigest()
    (shared / "m" / "model.gguf").unlink()
    assert await found.refresh("m") is None
    assert found.models() == []


async def test_a_folder_named_after_a_catalogue_model_is_that_models_copy_and_not_hashed(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    shared = tmp_path / "shared"
    place(shared / "gemma-3-270m", {"gemma-3-270m-q4_k_m.gguf": GGUF})
    place(shared / "mine", {"model.gguf": GGUF})
    asked: list[str] = []

    async def pinned(model_id: str) -> bool:
        asked.append(model_id)
        return model_id == "gemma-3-270m"

    found = LocalModels(Storage(tmp_path / "models", io_threads), shared, 0, pinned)
    with capture_logs() as events:
        await found.scan()
        await found.scan()
    assert [m.id for m in found.models()] == ["mine"]
    assert [e["path"] for e in events if e["event"] == "file.hashing"] == [
        str(shared / "mine" / "model.gguf")
    ]
    assert asked == ["gemma-3-270m", "mine"]  # a catalogue id is asked about once; a found model once
