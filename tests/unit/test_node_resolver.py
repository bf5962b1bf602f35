"""The resolver against a stand-in balancer: manifests reused briefly, and deletes that race a fetch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.errors import ErrorCode, LlmlbError
from common.types import Backend, ManifestFile, Model, ModelState
from node.blob_sources import BlobSource
from node.downloader import Downloader
from node.model_book import ModelBook
from node.resolver import MANIFEST_TTL_S, Resolver
from node.storage import Storage
from tests.unit.test_node_storage import DATA, manifest_file, model, node_config


class Balancer:
    """Answers GetModel from a dict and counts the calls; ``peers_gate`` can hold a resolution."""

    def __init__(self, *models: Model) -> None:
        self.models = {m.id: m for m in models}
        self.asked = 0
        self.peers_gate: asyncio.Event | None = None
        self.peers_asked = asyncio.Event()

    async def get_model(self, model_id: str) -> Model:
        self.asked += 1
        if model_id not in self.models:
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"no {model_id}")
        return self.models[model_id]

    async def peer_sources(self, model_id: str) -> list[BlobSource]:
        self.peers_asked.set()
        if self.peers_gate is not None:
            await self.peers_gate.wait()
        return []

    def swarm_name(self) -> str:
        return ""

    def proxy_source(self) -> BlobSource:
        raise AssertionError("not used")


class GatedSource:
    """Sends the first 256 KiB of the file, then waits until the test opens the gate."""

    name = "origin"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent_some = asyncio.Event()

    async def stream(
        self, model: Model, file: ManifestFile, offset: int, length: int = 0
    ) -> AsyncIterator[bytes]:
        yield DATA[offset : offset + 256 * 1024]
        self.sent_some.set()
        await self.gate.wait()
        yield DATA[offset + 256 * 1024 :]


@pytest.fixture
def io_threads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def parts(
    tmp_path: Path, io_threads: ThreadPoolExecutor, balancer: Balancer
) -> tuple[Resolver, Storage, GatedSource]:
    config = node_config(tmp_path, XLLM_PEER_FETCH="1")
    storage = Storage(config.models_dir, io_threads)
    source = GatedSource()
    states = ModelBook()
    resolver = Resolver(config, Backend.CPU, storage, Downloader(storage, config), states, balancer, source)
    return resolver, storage, source


async def test_a_manifest_is_reused_briefly_and_dropped_by_a_delete(
    tmp_path: Path, io_threads: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("node.resolver.time.monotonic", lambda: clock[0])
    m = model(manifest_file())
    balancer = Balancer(m)
    resolver, _, _ = parts(tmp_path, io_threads, balancer)
    assert await resolver.manifest(m.id) == m
    clock[0] += MANIFEST_TTL_S / 2
    assert await resolver.manifest(m.id) == m
    assert balancer.asked == 1  # the second request saved a round trip to the balancer
    resolver.forget(m.id)
    await resolver.manifest(m.id)
    assert balancer.asked == 2  # a delete drops the copy at once
    clock[0] += MANIFEST_TTL_S + 0.1
    await resolver.manifest(m.id)
    assert balancer.asked == 3  # and an old copy is asked for again
    del balancer.models[m.id]
    clock[0] += MANIFEST_TTL_S + 0.1
    with pytest.raises(LlmlbError) as caught:
        await resolver.manifest(m.id)
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND


async def test_a_balancer_that_cannot_be_asked_leaves_the_last_manifest_seen_and_is_never_model_not_found(
    tmp_path: Path, io_threads: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a node meets while the replica it talks to restarts: the model exists, the answer is late.
    clock = [1000.0]
    monkeypatch.setattr("node.resolver.time.monotonic", lambda: clock[0])
    m = model(manifest_file())
    balancer = Balancer(m)
    resolver, _, _ = parts(tmp_path, io_threads, balancer)
    assert await resolver.manifest(m.id) == m

    async def unreachable(model_id: str) -> Model:
        raise LlmlbError(ErrorCode.NO_CAPABLE_NODES, "balancer unreachable")

    balancer.get_model = unreachable  # type: ignore[method-assign]
    clock[0] += MANIFEST_TTL_S * 10
    assert await resolver.manifest(m.id) == m  # past its TTL, still the balancer's last word

    resolver.forget(m.id)  # a delete: nothing stale may come back
    for model_id in (m.id, "never-seen"):
        with pytest.raises(LlmlbError) as caught:
            await resolver.manifest(model_id)
        assert caught.value.code is ErrorCode.UNAVAILABLE, caught.value
        assert "cannot be asked (balancer unreachable)" in caught.value.message


async def delete(resolver: Resolver, storage: Storage, model_id: str) -> None:
    """What a node does on a delete command, minus the model pool (see NodeCommands.delete_model)."""
    resolver.forget(model_id)
    await resolver._downloader.cancel_model(model_id)
    await storage.delete(model_id)


async def test_a_delete_during_a_transfer_leaves_nothing_behind(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    m = model(manifest_file())
    resolver, storage, source = parts(tmp_path, io_threads, Balancer(m))
    resolving = asyncio.create_task(resolver.resolve(m.id))
    await asyncio.wait_for(source.sent_some.wait(), 5)
    await delete(resolver, storage, m.id)
    with pytest.raises(LlmlbError) as caught:
        await resolving
    assert (
        caught.value.code is ErrorCode.MODEL_NOT_FOUND
        and "deleted while being fetched" in caught.value.message
    )
    assert not storage.model_dir(m.id).exists()
    assert resolver._states.get(m.id).state == ModelState.ABSENT


async def test_a_delete_before_the_transfer_starts_stops_it_and_leaves_nothing(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    m = model(manifest_file())
    balancer = Balancer(m)
    balancer.peers_gate = asyncio.Event()  # the resolution is between its checks and its download
    resolver, storage, source = parts(tmp_path, io_threads, balancer)
    resolving = asyncio.create_task(resolver.resolve(m.id))
    await asyncio.wait_for(balancer.peers_asked.wait(), 5)
    await delete(resolver, storage, m.id)
    balancer.peers_gate.set()
    with pytest.raises(LlmlbError) as caught:
        await resolving
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND
    assert not source.sent_some.is_set()  # not a byte asked for
    assert not storage.model_dir(m.id).exists()  # not even the saved manifest
    assert resolver._states.get(m.id).state == ModelState.ABSENT


async def test_a_caller_leaving_is_not_mistaken_for_a_delete(
    tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    m = model(manifest_file())
    resolver, _, source = parts(tmp_path, io_threads, Balancer(m))
    resolving = asyncio.create_task(resolver.resolve(m.id))
    await asyncio.wait_for(source.sent_some.wait(), 5)
    resolving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await resolving
    source.gate.set()
    path = await asyncio.wait_for(resolver.resolve(m.id), 5)  # the shared transfer went on
    assert path.paths[m.files[0].filename].read_bytes() == DATA
