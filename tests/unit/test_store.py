"""The balancer's metadata store, on real SQLite files and on a real PostgreSQL server.

Every test that takes ``store`` or ``database_url`` runs on both engines. One module, over the usual
size: every store behaviour shares the builders below, and splitting by table would scatter them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Connection, Integer, MetaData, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from balancer.fleet.token import SECRET_NAME, FleetTokens, derive
from balancer.scheduler import Deployment
from balancer.store import Store, TooLong
from balancer.store.engine import async_url
from balancer.store.migrations import alembic_config, head_revision
from balancer.store.tables import Base
from common.errors import ErrorCode, LlmlbError
from common.types import (
    NO_LIMITS,
    ApiKey,
    Backend,
    Capability,
    CommandKind,
    FileFormat,
    GpuDevice,
    KeyLimits,
    ManifestFile,
    Model,
    ModelSource,
    Node,
    NodeState,
    Scope,
    UsageCount,
)
from tests.fixtures.postgres import PostgresServer


def db_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "llmlb.db"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(database_url)
    yield opened
    await opened.close()


def make_model(model_id: str = "org/tiny-gguf", **changes: Any) -> Model:
    model = Model(
        id=model_id,
        name="Tiny",
        source=ModelSource.HF,
        repo_id="org/tiny",
        revision="0123456789abcdef",
        origin="https://huggingface.co",
        # Deliberately not alphabetical: the manifest's order must survive.
        files=[
            ManifestFile("tiny.gguf", FileFormat.GGUF, 1_000, "a" * 64, (Backend.CUDA, Backend.CPU)),
            ManifestFile("config.json", FileFormat.CONFIG, 20),
            ManifestFile("tiny.metal.bin", FileFormat.METAL, 5_000_000_000, "b" * 64, (Backend.METAL,)),
        ],
        capabilities=[Capability.CHAT, Capability.COMPLETION],
        tags=["small", "test"],
        required_vram_mb=512,
        chat_template="{{ messages }}",
    )
    return dataclasses.replace(model, **changes)


def make_node(node_id: str = "node-a", **changes: Any) -> Node:
    node = Node(
        id=node_id,
        address="127.0.0.1:50051",
        backends=[Backend.CUDA, Backend.CPU],
        gpus=[GpuDevice(0, "NVIDIA H100", 81_559, 80_000)],
        runtimes=["llama.cpp", "whisper"],
        version="0.1.0",
        state=NodeState.ONLINE,
    )
    return dataclasses.replace(node, **changes)


def make_key(key_id: str = "key-1", prefix: str = "llmlb_ab", secret_hash: str = "hash-1") -> ApiKey:
    return ApiKey(
        id=key_id, name="ci", prefix=prefix, secret_hash=secret_hash, scopes=(Scope.API, Scope.ADMIN)
    )


def without_times(model: Model) -> Model:
    return dataclasses.replace(model, created_at=None, updated_at=None)


# models


async def test_model_round_trips_with_files_in_order_and_enums(store: Store) -> None:
    model = make_model()

    stored = await store.upsert_model(model)
    fetched = await store.get_model(model.id)

    assert fetched is not None
    assert without_times(fetched) == model
    assert fetched == stored
    assert [f.filename for f in fetched.files] == ["tiny.gguf", "config.json", "tiny.metal.bin"]
    assert type(fetched.source) is ModelSource
    assert all(type(c) is Capability for c in fetched.capabilities)
    assert fetched.files[0].backends == (Backend.CUDA, Backend.CPU)
    assert all(type(b) is Backend for f in fetched.files for b in f.backends)
    assert fetched.files[2].size_bytes == 5_000_000_000
    assert fetched.total_bytes == 5_000_001_020


async def test_timestamps_come_back_timezone_aware_utc(store: Store) -> None:
    before = datetime.now(UTC)
    stored = await store.upsert_model(make_model())
    fetched = await store.get_model(stored.id)

    assert fetched is not None and fetched.created_at is not None and fetched.updated_at is not None
    assert fetched.created_at.tzinfo is UTC
    assert before <= fetched.created_at <= datetime.now(UTC)


async def test_upsert_replaces_files_and_fields_but_keeps_created_at(store: Store) -> None:
    first = await store.upsert_model(make_model())
    replacement = make_model(
        name="Tiny v2",
        revision="fedcba9876543210",
        files=[ManifestFile("tiny-q8.gguf", FileFormat.GGUF, 2_000, "c" * 64)],
        capabilities=[Capability.EMBEDDING],
    )

    second = await store.upsert_model(replacement)
    fetched = await store.get_model(replacement.id)

    assert fetched is not None
    assert without_times(fetched) == replacement
    assert [f.filename for f in fetched.files] == ["tiny-q8.gguf"]
    assert fetched.created_at == first.created_at
    assert first.updated_at is not None and second.updated_at is not None
    assert second.updated_at >= first.updated_at


async def test_concurrent_registrations_of_one_model_store_it_once(store: Store) -> None:
    results = await asyncio.gather(*(store.upsert_model(make_model(name=f"v{i}")) for i in range(10)))

    models = await store.list_models()
    assert len(models) == 1
    assert models[0].name in {r.name for r in results}
    assert {r.created_at for r in results} == {models[0].created_at}
    assert [f.filename for f in models[0].files] == ["tiny.gguf", "config.json", "tiny.metal.bin"]


async def test_list_models_is_sorted_by_id_and_each_has_its_own_files(store: Store) -> None:
    await store.upsert_model(make_model("zeta/b", files=[ManifestFile("z.onnx", FileFormat.ONNX, 3)]))
    await store.upsert_model(make_model("alpha/a"))

    models = await store.list_models()

    assert [m.id for m in models] == ["alpha/a", "zeta/b"]
    assert [f.filename for f in models[0].files] == ["tiny.gguf", "config.json", "tiny.metal.bin"]
    assert [f.filename for f in models[1].files] == ["z.onnx"]


async def test_unknown_model_is_none(store: Store) -> None:
    assert await store.get_model("nobody/nothing") is None
    assert await store.delete_model("nobody/nothing") is False


async def test_a_value_longer_than_its_column_is_refused_alike_on_every_engine(store: Store) -> None:
    # PostgreSQL would refuse it with a driver error; SQLite would keep it whole.
    with pytest.raises(TooLong, match="version is 65 characters long; the limit is 64"):
        await store.upsert_node(make_node(version="v" * 65))
    with pytest.raises(TooLong, match="name is 257 characters"):
        await store.upsert_model(make_model(name="n" * 257))
    long_file = ManifestFile("f" * 1025 + ".gguf", FileFormat.GGUF, 1)
    with pytest.raises(TooLong, match="filename"):
        await store.upsert_model(make_model(files=[long_file]))

    assert await store.list_nodes() == [] and await store.list_models() == []
    stored = await store.upsert_node(make_node(version="v" * 64))  # at the limit is fine
    assert stored.version == "v" * 64


async def test_naive_datetime_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        await store.upsert_model(make_model(created_at=datetime(2025, 1, 1)))
    assert await store.list_models() == []


# deletion and the catalogue


async def test_delete_hides_model_and_queues_one_command_per_known_node(store: Store) -> None:
    await store.upsert_node(make_node("node-a"))
    await store.upsert_node(make_node("node-b", state=NodeState.OFFLINE))
    await store.upsert_model(make_model())

    assert await store.delete_model("org/tiny-gguf") is True

    assert await store.get_model("org/tiny-gguf") is None
    assert await store.list_models() == []
    for node_id in ("node-a", "node-b"):
        pending = await store.pending_commands(node_id)
        assert [(c.node_id, c.kind, c.model_id) for c in pending] == [
            (node_id, CommandKind.DELETE_MODEL, "org/tiny-gguf")
        ]
    assert await store.delete_model("org/tiny-gguf") is False


async def test_delete_is_committed_before_it_returns(database_url: str, store: Store) -> None:
    await store.upsert_node(make_node())
    await store.upsert_model(make_model())
    await store.delete_model("org/tiny-gguf")

    # A second store on the same database, the first never closed: as after a crash right after delete.
    other = await Store.open(database_url)
    try:
        assert await other.get_model("org/tiny-gguf") is None
        assert [c.model_id for c in await other.pending_commands("node-a")] == ["org/tiny-gguf"]
    finally:
        await other.close()


async def test_seed_catalog_does_not_resurrect_a_deleted_model_but_upsert_does(store: Store) -> None:
    catalogue = [make_model("org/tiny-gguf"), make_model("org/other")]
    assert await store.seed_catalog(catalogue) == ["org/tiny-gguf", "org/other"]
    await store.delete_model("org/tiny-gguf")

    assert await store.seed_catalog(catalogue) == []
    assert [m.id for m in await store.list_models()] == ["org/other"]

    revived = await store.upsert_model(make_model("org/tiny-gguf"))
    fetched = await store.get_model("org/tiny-gguf")
    assert fetched == revived
    assert fetched is not None and fetched.files[0].filename == "tiny.gguf"


async def test_seed_catalog_never_overwrites_and_marks_catalogue_models(store: Store) -> None:
    await store.upsert_model(make_model("org/tiny-gguf", name="registered at run time"))

    inserted = await store.seed_catalog(
        [make_model("org/tiny-gguf", name="catalogue"), make_model("org/new")]
    )

    assert inserted == ["org/new"]
    kept = await store.get_model("org/tiny-gguf")
    seeded = await store.get_model("org/new")
    assert kept is not None and kept.name == "registered at run time" and kept.from_catalog is False
    assert seeded is not None and seeded.from_catalog is True
    assert [f.filename for f in seeded.files] == ["tiny.gguf", "config.json", "tiny.metal.bin"]


# nodes


async def test_node_round_trips_and_reregistration_keeps_registered_at(store: Store) -> None:
    first = await store.upsert_node(make_node())
    second = await store.upsert_node(make_node(address="10.0.0.2:50051", version="0.2.0"))
    fetched = await store.get_node("node-a")

    assert fetched == second
    assert fetched is not None
    assert fetched.registered_at == first.registered_at
    assert fetched.address == "10.0.0.2:50051"
    assert fetched.gpus == [GpuDevice(0, "NVIDIA H100", 81_559, 80_000)]
    assert fetched.backends == [Backend.CUDA, Backend.CPU]
    assert fetched.runtimes == ["llama.cpp", "whisper"]


async def test_a_session_attaches_a_node_to_one_replica_and_only_that_replica_detaches_it(
    store: Store,
) -> None:
    await store.upsert_node(make_node())
    assert await store.attach_node("node-a", "replica-1", '{"models":[]}')
    assert not await store.attach_node("node-unknown", "replica-1", "{}")
    node = await store.get_node("node-a")
    assert node is not None and (node.state, node.replica_id, node.live) == (
        NodeState.ONLINE,
        "replica-1",
        '{"models":[]}',
    )

    # The node moved to replica-2 before replica-1 noticed its old session end.
    assert await store.attach_node("node-a", "replica-2", "{}")
    assert not await store.update_node_live("node-a", "replica-1", '{"stale":true}')
    assert not await store.detach_node("node-a", "replica-1")
    node = await store.get_node("node-a")
    assert node is not None and (node.state, node.replica_id, node.live) == (
        NodeState.ONLINE,
        "replica-2",
        "{}",
    )

    # Registering again (a node re-registers before every session) does not take it offline.
    await store.upsert_node(make_node(address="10.0.0.9:50051"))
    node = await store.get_node("node-a")
    assert node is not None and node.state is NodeState.ONLINE and node.address == "10.0.0.9:50051"

    assert await store.detach_node("node-a", "replica-2")
    node = await store.get_node("node-a")
    assert node is not None and (node.state, node.replica_id, node.live) == (NodeState.OFFLINE, "", "")


async def test_a_released_replica_leaves_its_nodes_offline_and_beats_tell_who_is_silent(store: Store) -> None:
    for node_id in ("node-a", "node-b", "node-c"):
        await store.upsert_node(make_node(node_id))
    await store.attach_node("node-a", "replica-1", "{}")
    await store.attach_node("node-b", "replica-1", "{}")
    await store.attach_node("node-c", "replica-2", "{}")
    assert not await store.replica_beat("replica-1")  # its first beat records it
    assert await store.replica_beat("replica-1")
    await store.replica_beat("replica-2")
    assert await store.replicas() == ["replica-1", "replica-2"]
    assert await store.stale_replicas(60) == []
    assert await store.stale_replicas(-60) == ["replica-1", "replica-2"]  # every beat is in the past

    assert await store.release_replica("replica-1") == ["node-a", "node-b"]

    assert await store.replicas() == ["replica-2"]
    states = {n.id: (n.state, n.replica_id) for n in await store.list_nodes()}
    assert states == {
        "node-a": (NodeState.OFFLINE, ""),
        "node-b": (NodeState.OFFLINE, ""),
        "node-c": (NodeState.ONLINE, "replica-2"),
    }


async def test_nodes_online_without_a_replica_are_released(store: Store) -> None:
    await store.upsert_node(make_node("node-a", state=NodeState.ONLINE))  # as written before replicas
    await store.upsert_node(make_node("node-b"))
    await store.attach_node("node-b", "replica-1", "{}")

    assert await store.release_unattached() == ["node-a"]
    assert {n.id: n.state for n in await store.list_nodes()} == {
        "node-a": NodeState.OFFLINE,
        "node-b": NodeState.ONLINE,
    }


async def test_removing_a_node_drops_its_pending_commands(store: Store) -> None:
    await store.upsert_node(make_node("node-a"))
    await store.upsert_node(make_node("node-b"))
    await store.add_command("node-a", CommandKind.PREFETCH, "org/tiny-gguf")
    await store.add_command("node-b", CommandKind.PREFETCH, "org/tiny-gguf")

    assert await store.remove_node("node-a") is True

    assert await store.get_node("node-a") is None
    await store.upsert_node(make_node("node-a"))  # the same node registering again starts clean
    assert await store.pending_commands("node-a") == []
    assert len(await store.pending_commands("node-b")) == 1
    assert await store.remove_node("node-gone") is False


# durable node commands


async def test_pending_commands_are_oldest_first_until_acknowledged(store: Store) -> None:
    await store.upsert_node(make_node())
    first = await store.add_command("node-a", CommandKind.PREFETCH, "org/one")
    second = await store.add_command("node-a", CommandKind.DELETE_MODEL, "org/two")

    assert await store.pending_commands("node-a") == [first, second]
    assert await store.ack_command(first.id) is True
    assert await store.pending_commands("node-a") == [second]
    assert await store.ack_command(first.id) is False


async def test_an_acknowledged_command_id_is_never_reused(store: Store) -> None:
    await store.upsert_node(make_node())
    old = await store.add_command("node-a", CommandKind.PREFETCH, "org/one")
    await store.ack_command(old.id)

    new = await store.add_command("node-a", CommandKind.PREFETCH, "org/two")

    assert new.id > old.id
    assert await store.ack_command(old.id) is False  # a late duplicate ack cannot clear the new command
    assert await store.pending_commands("node-a") == [new]


async def test_command_for_unknown_node_is_refused(store: Store) -> None:
    with pytest.raises(KeyError):
        await store.add_command("node-x", CommandKind.PREFETCH, "org/one")


# api keys


async def test_keys_are_found_by_hash_listed_and_counted(store: Store) -> None:
    stored = await store.add_key(make_key("key-1", "llmlb_aa", "hash-1"))
    await store.add_key(make_key("key-2", "llmlb_bb", "hash-2"))

    assert await store.find_key("hash-1") == stored
    assert stored.created_at is not None and stored.scopes == (Scope.API, Scope.ADMIN)
    assert await store.find_key("hash-unknown") is None
    assert [k.id for k in await store.list_keys()] == ["key-1", "key-2"]
    assert await store.count_keys() == 2


async def test_a_nodes_owner_and_a_keys_bound_node_id_are_kept(store: Store) -> None:
    bound = dataclasses.replace(make_key("key-1", "llmlb_aa", "hash-1"), node_id="node-a")
    assert (await store.add_key(bound)).node_id == "node-a"
    found = await store.find_key("hash-1")
    assert found is not None and found.node_id == "node-a"
    await store.upsert_node(make_node(owner_key_id="key-1"))

    seen: list[Node | None] = []

    def refuse(stored: Node | None) -> Node:
        seen.append(stored)
        raise LlmlbError(ErrorCode.FORBIDDEN, "not yours")

    with pytest.raises(LlmlbError):
        await store.upsert_node(make_node(address="10.6.6.6:1", owner_key_id="key-2"), refuse)
    assert seen[0] is not None and seen[0].owner_key_id == "key-1"
    kept = await store.get_node("node-a")
    assert kept is not None and (kept.address, kept.owner_key_id) == ("127.0.0.1:50051", "key-1")
    # What the check returns is what is written.
    await store.upsert_node(make_node(), lambda stored: make_node(owner_key_id="key-3"))
    moved = await store.get_node("node-a")
    assert moved is not None and moved.owner_key_id == "key-3"


async def test_adding_a_key_twice_is_refused(store: Store) -> None:
    await store.add_key(make_key("key-1", secret_hash="hash-1"))
    with pytest.raises(ValueError):
        await store.add_key(make_key("key-1", secret_hash="hash-other"))
    with pytest.raises(ValueError):
        await store.add_key(make_key("key-other", secret_hash="hash-1"))
    assert await store.count_keys() == 1


async def test_revoke_by_id_or_prefix_and_revoked_keys_are_still_found(store: Store) -> None:
    await store.add_key(make_key("key-1", "llmlb_aa", "hash-1"))
    await store.add_key(make_key("key-2", "llmlb_bb", "hash-2"))

    assert await store.revoke_key("key-1") is True
    assert await store.revoke_key("llmlb_bb") is True
    assert await store.revoke_key("key-1") is False
    assert await store.revoke_key("llmlb_zz") is False

    revoked = await store.find_key("hash-1")
    assert revoked is not None and revoked.revoked_at is not None
    assert all(k.revoked_at is not None for k in await store.list_keys())
    assert await store.count_keys() == 2


async def test_revoking_an_ambiguous_prefix_revokes_nothing(store: Store) -> None:
    await store.add_key(make_key("key-1", "llmlb_aa", "hash-1"))
    await store.add_key(make_key("key-2", "llmlb_aa", "hash-2"))

    with pytest.raises(ValueError, match="matches 2 keys"):
        await store.revoke_key("llmlb_aa")

    assert all(k.revoked_at is None for k in await store.list_keys())


async def test_touch_key_records_last_use(store: Store) -> None:
    await store.add_key(make_key())
    used = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)

    await store.touch_key("key-1", used)

    key = await store.find_key("hash-1")
    assert key is not None and key.last_used_at == used


# usage


async def test_usage_batches_add_to_their_minute_and_read_back_filtered_in_order(database_url: str) -> None:
    minute = datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
    later = datetime(2030, 1, 2, 3, 5, tzinfo=UTC)
    store = await Store.open(database_url)
    try:
        await store.add_usage(
            [UsageCount("key-b", "m", minute, 1, 0, 10, 20), UsageCount("key-a", "m", later, 1)]
        )
        await store.add_usage([UsageCount("key-b", "m", minute, 2, 1, 5, 5)])  # the same minute: added
        assert await store.usage(minute) == [
            UsageCount("key-a", "m", later, 1, 0, 0, 0),
            UsageCount("key-b", "m", minute, 3, 1, 15, 25),
        ]
        assert [c.key_id for c in await store.usage(minute, key_id="key-b", model="m")] == ["key-b"]
        assert await store.usage(later) == [UsageCount("key-a", "m", later, 1, 0, 0, 0)]
        assert await store.usage(minute, model="other") == []
    finally:
        await store.close()
    reopened = await Store.open(database_url)  # usage survives a restart
    try:
        assert len(await reopened.usage(minute)) == 2
    finally:
        await reopened.close()


# deployments


async def test_deployments_round_trip_replace_in_place_and_survive_a_restart(database_url: str) -> None:
    fixed = Deployment("org/big-gguf", copies=3, selector={"zone": "a", "gpu": "h100"}, memory_mb=20_000)
    scaled = Deployment("org/small-gguf", copies=None, min_copies=0, max_copies=4)
    store = await Store.open(database_url)
    try:
        stored = await store.put_deployment(fixed)
        await store.put_deployment(scaled)
        assert stored.created_at is not None and stored.created_at == stored.updated_at
        assert await store.get_deployment("org/big-gguf") == stored
        assert dict(stored.selector) == {"zone": "a", "gpu": "h100"} and stored.memory_mb == 20_000

        changed = await store.put_deployment(dataclasses.replace(fixed, copies=5, selector={}))
        assert changed.copies == 5 and dict(changed.selector) == {}
        assert changed.created_at == stored.created_at
        assert changed.updated_at is not None and changed.updated_at >= stored.updated_at  # type: ignore[operator]
        assert await store.get_deployment("org/unknown") is None
    finally:
        await store.close()

    reopened = await Store.open(database_url)
    try:
        listed = await reopened.list_deployments()
        assert [d.model_id for d in listed] == ["org/big-gguf", "org/small-gguf"]
        assert listed[0].copies == 5
        assert (listed[1].copies, listed[1].min_copies, listed[1].max_copies) == (None, 0, 4)
        assert listed[1].autoscaled and not listed[0].autoscaled
        assert await reopened.delete_deployment("org/big-gguf") is True
        assert await reopened.delete_deployment("org/big-gguf") is False
        assert [d.model_id for d in await reopened.list_deployments()] == ["org/small-gguf"]
    finally:
        await reopened.close()


async def test_a_deployment_for_a_model_id_longer_than_its_column_is_refused(store: Store) -> None:
    with pytest.raises(TooLong):
        await store.put_deployment(Deployment("org/" + "m" * 300))
    assert await store.list_deployments() == []


def test_a_deployment_must_say_either_a_count_or_a_range() -> None:
    for wrong in (
        {"copies": None},
        {"copies": 2, "max_copies": 3},
        {"copies": None, "min_copies": 3, "max_copies": 2},
        {"copies": -1},
        {"memory_mb": 0},
        {"selector": {"zone": ""}},
    ):
        with pytest.raises(ValueError, match="deployment of"):
            Deployment("org/m", **wrong)  # type: ignore[arg-type]


# opening, restarts and migrations


async def test_everything_survives_a_restart(database_url: str) -> None:
    first = await Store.open(database_url)
    model = await first.upsert_model(make_model())
    node = await first.upsert_node(make_node())
    command = await first.add_command("node-a", CommandKind.PREFETCH, model.id)
    key = await first.add_key(make_key())
    await first.close()

    second = await Store.open(database_url)
    try:
        assert await second.get_model(model.id) == model
        assert await second.get_node(node.id) == node
        assert await second.pending_commands("node-a") == [command]
        assert await second.find_key(key.secret_hash) == key
    finally:
        await second.close()


async def test_a_secret_is_made_once_and_every_store_on_the_database_reads_the_same_one(
    database_url: str,
) -> None:
    first, second = await Store.open(database_url), await Store.open(database_url)
    try:  # two replicas on one database, both starting for the first time at once
        made = await asyncio.gather(
            first.secret("node-fleet", lambda: "made-by-first"),
            second.secret("node-fleet", lambda: "made-by-second"),
        )
        assert made[0] == made[1] and made[0] in ("made-by-first", "made-by-second")
        assert await second.secret("other", lambda: "another") == "another"
    finally:
        await first.close()
        await second.close()

    reopened = await Store.open(database_url)
    try:
        assert await reopened.secret("node-fleet", lambda: "made-after-a-restart") == made[0]
    finally:
        await reopened.close()


async def test_the_fleet_token_survives_a_restart_and_is_not_the_stored_secret(database_url: str) -> None:
    store = await Store.open(database_url)
    tokens = FleetTokens(store, 3600.0, clock=lambda: 7200.0)
    await tokens.load()
    token = tokens.current()
    await store.close()
    store = await Store.open(database_url)
    try:
        again = FleetTokens(store, 3600.0, clock=lambda: 7200.0)
        await again.load()
        assert again.current() == token
        stored = await store.secret(SECRET_NAME, lambda: "unused")
        assert token != stored and token == derive(stored, 2) and len(token) == 64
    finally:
        await store.close()


async def test_rotating_the_fleet_token_replaces_the_secret_for_every_replica(database_url: str) -> None:
    store = await Store.open(database_url)
    try:
        here, there = FleetTokens(store, 3600.0), FleetTokens(store, 3600.0)
        await here.load()
        await there.load()
        kept = here.current()
        await here.rotate()
        assert here.current() != kept and not here.accepts(kept)
        assert await there.reload() and there.current() == here.current()
        assert not await there.reload()  # unchanged since
    finally:
        await store.close()


def _versions_and_tables(connection: Connection) -> tuple[list[str], set[str]]:
    versions = list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
    return versions, set(inspect(connection).get_table_names())


async def test_reopening_leaves_the_schema_at_head(database_url: str) -> None:
    for _ in range(2):
        store = await Store.open(database_url)
        await store.close()

    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            versions, tables = await connection.run_sync(_versions_and_tables)
    finally:
        await engine.dispose()
    assert versions == [head_revision()]
    assert head_revision() == "0008"
    assert {
        "models",
        "manifest_files",
        "nodes",
        "node_commands",
        "api_keys",
        "balancer_secrets",
        "usage",
        "deployments",
        "leases",
    } <= tables


async def test_the_alembic_command_migrates_a_url_alone_and_the_store_then_finds_it_at_head(
    database_url: str,
) -> None:
    # What an operator's `alembic upgrade head` does: no connection handed in, only the URL.
    await asyncio.to_thread(command.upgrade, alembic_config(database_url), "head")
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            versions, tables = await connection.run_sync(_versions_and_tables)
    finally:
        await engine.dispose()
    assert versions == [head_revision()] and "models" in tables

    store = await Store.open(database_url)
    try:
        assert await store.upsert_model(make_model()) == await store.get_model("org/tiny-gguf")
    finally:
        await store.close()


async def test_balancers_starting_together_on_a_new_postgresql_database_all_start(
    postgres_url: str,
) -> None:
    # Replicas deployed at once: one migrates, the others wait for it and find the schema at head.
    stores = await asyncio.gather(*(Store.open(postgres_url) for _ in range(4)))
    try:
        await stores[0].upsert_model(make_model())
        assert [[m.id for m in await s.list_models()] for s in stores] == [["org/tiny-gguf"]] * 4
    finally:
        for opened in stores:
            await opened.close()


async def test_listings_are_in_code_point_order_whatever_the_database_collation(
    postgres_server: PostgresServer,
) -> None:
    # An ICU collation sorts "node_c" before "Node-Z"; SQLite and Python sort by code point.
    name = postgres_server.create_database(icu_locale="en-US")
    store = await Store.open(postgres_server.url(name))
    try:
        ids = ["node-b", "Node-Z", "node_c", "node.a"]
        for node_id in ids:
            await store.upsert_node(make_node(node_id))
            await store.upsert_model(make_model(node_id.lower().replace("_", "-") + "/m"))
        assert [n.id for n in await store.list_nodes()] == sorted(ids)
        assert [m.id for m in await store.list_models()] == ["node-b/m", "node-c/m", "node-z/m", "node.a/m"]
    finally:
        await store.close()
        postgres_server.drop_database(name)


def test_a_url_without_a_driver_gets_the_async_one() -> None:
    assert async_url("postgresql://u:p@db:5432/llmlb").drivername == "postgresql+asyncpg"
    assert async_url("sqlite:////var/lib/llmlb.db").drivername == "sqlite+aiosqlite"
    assert async_url("postgresql+asyncpg://db/llmlb").drivername == "postgresql+asyncpg"


async def test_open_creates_parent_directories_from_any_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = tmp_path / "deep" / "er" / "llmlb.db"

    store = await Store.open(db_url(path))
    await store.upsert_model(make_model())
    await store.close()

    assert path.is_file()


async def test_sqlite_database_uses_wal_journal_mode(db_path: Path) -> None:
    store = await Store.open(db_url(db_path))
    try:
        with sqlite3.connect(db_path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        await store.close()


async def test_in_memory_database_is_refused() -> None:
    with pytest.raises(ValueError, match="in-memory"):
        await Store.open("sqlite+aiosqlite://")


def _schema_diffs(connection: Connection) -> tuple[list[Any], list[Any]]:
    """What autogenerate would change: for the tables as declared, and for them plus one column."""
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["nodes"].append_column(Column("zone", Integer, nullable=True))
    return compare_metadata(context, Base.metadata), compare_metadata(context, drifted)


async def test_migrations_match_the_tables_exactly(database_url: str, store: Store) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            exact, drifted = await connection.run_sync(_schema_diffs)
    finally:
        await engine.dispose()
    assert exact == []
    # The comparison does see drift: one extra column in the tables is reported.
    assert [(d[0], d[2], d[3].name) for d in drifted] == [("add_column", "nodes", "zone")]


# the scheduler's lease


async def test_one_holder_has_the_lease_until_it_expires_or_is_dropped(store: Store) -> None:
    assert await store.take_lease("scheduler", "replica-a", ttl_s=30)
    assert await store.take_lease("scheduler", "replica-a", ttl_s=30)  # the holder renews it
    assert not await store.take_lease("scheduler", "replica-b", ttl_s=30)  # held: refused
    await store.drop_lease("scheduler", "replica-b")  # not its lease: nothing happens
    assert not await store.take_lease("scheduler", "replica-b", ttl_s=30)
    await store.drop_lease("scheduler", "replica-a")
    assert await store.take_lease("scheduler", "replica-b", ttl_s=0.05)
    assert not await store.take_lease("scheduler", "replica-a", ttl_s=30)
    await asyncio.sleep(0.1)  # the clock the rule reads is the store's own: b's lease runs out
    assert await store.take_lease("scheduler", "replica-a", ttl_s=30)  # expired: taken over


async def test_a_key_stored_before_limits_existed_migrates_unlimited_and_takes_limits(
    database_url: str,
) -> None:
    # The schema as it was before migration 0008, with one key in it.
    await asyncio.to_thread(command.upgrade, alembic_config(database_url), "0007")
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO api_keys (id, name, prefix, secret_hash, scopes, created_at)"
                    " VALUES ('key-old', 'old', 'llmlb-old', 'hash-old', '[\"api\"]', :at)"
                ),
                {"at": datetime(2026, 1, 1, tzinfo=UTC)},
            )
    finally:
        await engine.dispose()

    store = await Store.open(database_url)  # migrates to head
    try:
        old = await store.find_key("hash-old")
        assert old is not None and old.limits == NO_LIMITS and old.scopes == (Scope.API,)
        limits = KeyLimits(
            rpm=60, tpm=1000, max_parallel=2, daily_tokens=10, monthly_tokens=20, models=("a/b",)
        )
        assert (await store.set_key_limits("key-old", limits)) == dataclasses.replace(old, limits=limits)
        assert (await store.find_key("hash-old")) == dataclasses.replace(old, limits=limits)
        assert await store.set_key_limits("key-missing", limits) is None
        cleared = await store.set_key_limits("key-old", NO_LIMITS)
        assert cleared is not None and cleared.limits == NO_LIMITS
    finally:
        await store.close()
    # And back: the downgrade drops the columns and keeps the key.
    await asyncio.to_thread(command.downgrade, alembic_config(database_url), "0007")
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            names = await connection.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns("api_keys")}
            )
            kept = (await connection.execute(text("SELECT id FROM api_keys"))).scalars().all()
    finally:
        await engine.dispose()
    assert "limit_rpm" not in names and "allowed_models" not in names and kept == ["key-old"]


async def test_usage_totals_add_every_model_of_a_key_from_a_minute_on(store: Store) -> None:
    at = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    await store.add_usage(
        [
            UsageCount("k1", "m/a", at, requests=2, prompt_tokens=10, completion_tokens=5),
            UsageCount("k1", "m/b", at.replace(minute=31), requests=1, prompt_tokens=1, completion_tokens=1),
            UsageCount("k1", "m/a", at.replace(minute=29), requests=7, prompt_tokens=100),
            UsageCount("k2", "m/a", at, requests=3, completion_tokens=9),
        ]
    )
    assert await store.usage_totals(["k1", "k2", "k3"], at.replace(second=40)) == {
        "k1": (3, 17),
        "k2": (3, 9),
    }
    assert await store.usage_totals(["k1"], at.replace(minute=0)) == {"k1": (10, 117)}
    assert await store.usage_totals([], at) == {}
