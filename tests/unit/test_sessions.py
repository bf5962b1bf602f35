"""Node sessions on a stopping balancer: every node is stored offline before the store closes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from balancer.fleet.sessions import NodeSessions
from balancer.fleet.view import Fleet
from balancer.replicas import Replicas
from balancer.store import Store
from common.types import CommandKind, NodeCommand, NodeState
from tests.unit.test_store import make_node


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(database_url)
    yield opened
    await opened.close()


def replicas(store: Store) -> Replicas:
    return Replicas(store, database_url="sqlite+aiosqlite:///unused.db", timeout_s=3.0)


async def state(store: Store, node_id: str) -> NodeState:
    node = await store.get_node(node_id)
    assert node is not None
    return node.state


async def test_close_all_stores_each_node_offline_and_a_late_handler_leaves_the_store_alone(
    store: Store,
) -> None:
    fleet = Fleet()
    sessions = NodeSessions(store, fleet, replicas(store), heartbeat_timeout_s=3.0)
    for node_id in ("a", "b"):
        await store.upsert_node(make_node(node_id, state=NodeState.OFFLINE))
    opened = [await sessions.open("a"), await sessions.open("b")]
    assert await state(store, "a") is NodeState.ONLINE

    await sessions.close_all()

    assert fleet.online() == []
    assert [await state(store, n) for n in ("a", "b")] == [NodeState.OFFLINE, NodeState.OFFLINE]
    assert all(s.stopped and s.closed.is_set() for s in opened)
    await store.close()
    # A stream handler grpc stopped mid-wait runs its own close only now, after the store closed:
    # it must find nothing left to do rather than reach into the closed store.
    await sessions.close(opened[0])


async def test_close_all_waits_for_a_close_already_under_way(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = Fleet()
    sessions = NodeSessions(store, fleet, replicas(store), heartbeat_timeout_s=3.0)
    await store.upsert_node(make_node("a"))
    session = await sessions.open("a")
    gate = asyncio.Event()
    write = store.detach_node

    async def slow_write(*args: Any, **kwargs: Any) -> bool:
        await gate.wait()
        return await write(*args, **kwargs)

    monkeypatch.setattr(store, "detach_node", slow_write)
    handler_close = asyncio.create_task(sessions.close(session))
    await asyncio.sleep(0)
    closing_all = asyncio.create_task(sessions.close_all())
    await asyncio.sleep(0.05)
    assert not closing_all.done()  # the node's offline state is not stored yet

    gate.set()
    await asyncio.wait_for(asyncio.gather(handler_close, closing_all), 5)
    assert await state(store, "a") is NodeState.OFFLINE


async def test_a_closed_store_refuses_reads_and_writes(store: Store) -> None:
    await store.close()
    with pytest.raises(RuntimeError, match="store is closed"):
        await store.get_node("a")
    with pytest.raises(RuntimeError, match="store is closed"):
        await store.detach_node("a", "replica-1")


async def test_sessions_woken_together_read_their_queues_in_one_store_read(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete reaches every node at once; a thousand queue reads must not become a thousand queries."""
    fleet = Fleet()
    sessions = NodeSessions(store, fleet, replicas(store), heartbeat_timeout_s=3.0)
    ids = [f"n{i}" for i in range(20)]
    for node_id in ids:
        await store.upsert_node(make_node(node_id))
    opened = [await sessions.open(node_id) for node_id in ids]
    for node_id in ids:
        await store.add_command(node_id, CommandKind.DELETE_MODEL, f"model-of-{node_id}")
    reads: list[str] = []
    by_node, each = store.pending_by_node, store.pending_commands

    async def counted_by_node() -> dict[str, list[NodeCommand]]:
        reads.append("all")
        return await by_node()

    async def counted_each(node_id: str) -> list[NodeCommand]:
        reads.append(node_id)
        return await each(node_id)

    monkeypatch.setattr(store, "pending_by_node", counted_by_node)
    monkeypatch.setattr(store, "pending_commands", counted_each)

    sessions.notify_all()
    assert all(s.wake.is_set() for s in opened)
    queues = await asyncio.gather(*(sessions.pending(s) for s in opened))

    assert reads == ["all"]
    assert [[c.model_id for c in q] for q in queues] == [[f"model-of-{n}"] for n in ids]
    # A session woken alone (or not woken) reads its own queue.
    assert [c.model_id for c in await sessions.pending(opened[0])] == ["model-of-n0"]
    assert reads == ["all", "n0"]
    await sessions.close_all()
