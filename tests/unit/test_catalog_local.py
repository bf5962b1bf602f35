"""The catalogue's side of the original quickstarts: entries pinned at seeding, models placed by hand."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from balancer.catalog import Catalog, load_catalog
from balancer.origin import Origin, PinnedRepo, RemoteFile
from balancer.store import Store
from common.config import BalancerConfig
from common.errors import ErrorCode, LlmlbError
from common.types import FileFormat, ManifestFile, Model, ModelSource

SHA = hashlib.sha256(b"weights").hexdigest()


class OneRepoOrigin(Origin):
    """An origin holding one repository at one commit; ``down`` makes it unreachable."""

    def __init__(self, config: BalancerConfig, files: list[RemoteFile]) -> None:
        super().__init__(config)
        self.files = files
        self.down = False
        self.pins = 0

    async def pin(self, origin: str, repo_id: str, revision: str) -> PinnedRepo:
        self.pins += 1
        if self.down:
            raise LlmlbError(ErrorCode.ORIGIN_UNREACHABLE, "origin down")
        return PinnedRepo(origin, repo_id, "c" * 40, self.files)

    async def hash_missing(self, pinned: PinnedRepo, wanted: set[str]) -> PinnedRepo:
        return pinned


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'llmlb.db'}")
    yield store
    await store.close()


def config(tmp_path: Path) -> BalancerConfig:
    return BalancerConfig(home=tmp_path, database_url="sqlite+aiosqlite://")


def original_entry(tmp_path: Path) -> list[Model]:
    path = tmp_path / "supported_models.json"
    path.write_text(
        '{"models": [{"id": "llama-3.2-1b", "source": "hf_gguf", "repo_id": "bartowski/L",'
        ' "artifacts": [{"filename": "L.gguf", "size_bytes": 876000000}], "tags": ["chat"]}]}'
    )
    return load_catalog(path, "https://huggingface.co")


async def test_a_size_without_sha256_is_pinned_to_the_origins_exact_size_and_digest(
    tmp_path: Path, store: Store
) -> None:
    origin = OneRepoOrigin(config(tmp_path), [RemoteFile("L.gguf", 875_123_456, SHA)])
    with capture_logs() as events:
        await Catalog(store, origin).seed(original_entry(tmp_path))
    model = await store.get_model("llama-3.2-1b")
    assert model is not None
    assert (model.files[0].size_bytes, model.files[0].sha256, model.revision) == (875_123_456, SHA, "c" * 40)
    [pinned] = [e for e in events if e["event"] == "catalog.size_pinned"]
    assert (pinned["published_bytes"], pinned["bytes"]) == (876_000_000, 875_123_456)


async def test_an_entry_the_origin_could_not_pin_is_pinned_at_the_next_start(
    tmp_path: Path, store: Store
) -> None:
    origin = OneRepoOrigin(config(tmp_path), [RemoteFile("L.gguf", 875_123_456, SHA)])
    origin.down = True
    await Catalog(store, origin).seed(original_entry(tmp_path))
    unpinned = await store.get_model("llama-3.2-1b")
    assert unpinned is not None and unpinned.files[0].sha256 == ""
    origin.down = False
    await Catalog(store, origin).seed(original_entry(tmp_path))
    pinned = await store.get_model("llama-3.2-1b")
    assert pinned is not None and pinned.files[0].sha256 == SHA
    pins = origin.pins
    await Catalog(store, origin).seed(original_entry(tmp_path))
    assert origin.pins == pins  # pinned once for good: later starts ask nothing


def hand_placed(model_id: str, filename: str = "model.gguf", sha256: str = SHA) -> Model:
    fmt = FileFormat.GGUF if filename.endswith(".gguf") else FileFormat.SAFETENSORS
    return Model(model_id, model_id, ModelSource.LOCAL, "", "", "", [ManifestFile(filename, fmt, 7, sha256)])


async def test_models_a_node_placed_by_hand_are_listed_as_local_and_catalogue_ids_stay_pinned(
    tmp_path: Path, store: Store
) -> None:
    catalog = Catalog(store, Origin(config(tmp_path)))
    await catalog.seed(load_catalog(None, "https://huggingface.co"))
    gemma = await catalog.get("gemma-3-270m")
    reported = [
        hand_placed("llama-3.2-1b"),
        hand_placed("tiny-st", "model.safetensors"),
        hand_placed("gemma-3-270m"),  # the catalogue's id
        hand_placed("../etc"),
        hand_placed("no-digest", sha256=""),
    ]
    with capture_logs() as events:
        changed = await catalog.register_local("node-1", reported)
    assert changed == ["llama-3.2-1b", "tiny-st"]
    local = await catalog.get("llama-3.2-1b")
    assert (local.source, local.files[0].sha256, [c.value for c in local.capabilities]) == (
        ModelSource.LOCAL,
        SHA,
        ["chat", "completion", "embedding"],
    )
    assert await catalog.get("gemma-3-270m") == gemma  # unchanged, pinned
    assert [e["model_id"] for e in events if e["event"] == "local_model.id_clash"] == ["gemma-3-270m"]
    assert len([e for e in events if e["event"] == "local_model.refused"]) == 2
    assert await catalog.register_local("node-2", reported[:2]) == []  # the same files: nothing to do
    changed_sha = hashlib.sha256(b"v2").hexdigest()
    assert await catalog.register_local("node-1", [hand_placed("llama-3.2-1b", sha256=changed_sha)]) == [
        "llama-3.2-1b"
    ]
    assert (await store.get_model("llama-3.2-1b")) is not None
