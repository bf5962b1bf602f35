"""The node-session protocol on a balancer's real parts (SQLite store, fleet, sessions), no transport.

gRPC stops a stream's handler by cancelling it when the node's connection drops, at whatever ``await``
the handler is in; these tests cancel it the same way at the moments a session is starting up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from balancer.fleet import protocol
from balancer.fleet.view import Fleet
from balancer.parts import BalancerParts
from balancer.store import Store
from common.config import BalancerConfig
from common.types import NodeState
from tests.fixtures.balancer_parts import balancer_parts
from tests.unit.test_store import make_node

NODE = "node-a"


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[BalancerParts]:
    config = BalancerConfig(home=tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'llmlb.db'}")
    store = await Store.open(config.database_url)
    await store.upsert_node(make_node(NODE))
    async with balancer_parts(config, store, Fleet()) as built:
        yield built


async def hello_then_silence() -> AsyncIterator[protocol.NodeMessage]:
    """A node that says hello and then nothing (its heartbeats do not matter before it is cancelled)."""
    yield protocol.Hello(NODE)
    await asyncio.Event().wait()


async def handle_stream(parts: BalancerParts) -> None:
    """What the gRPC servicer does with a stream: run the session and send everything it yields."""
    async with aclosing(protocol.serve(parts, hello_then_silence())) as outgoing:
        async for _ in outgoing:
            pass


@pytest.mark.parametrize(
    "parked_in",
    [
        "attach_node",  # storing the node online, just after the fleet lists it
        "pending_commands",  # looking for a queued drain, before the session's first answer
    ],
)
async def test_a_stream_dropped_while_its_session_starts_takes_the_node_out_of_rotation(
    parts: BalancerParts, monkeypatch: pytest.MonkeyPatch, parked_in: str
) -> None:
    store = parts.store
    entered, gate = asyncio.Event(), asyncio.Event()
    real = getattr(store, parked_in)

    async def parked(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, parked_in, parked)
    handler = asyncio.create_task(handle_stream(parts))
    await asyncio.wait_for(entered.wait(), 5)
    assert parts.fleet.is_online(NODE)  # ListNodes already shows it online, so a client may act on it

    handler.cancel()  # the node's connection dropped
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(handler, 5)

    assert not parts.fleet.is_online(NODE)
    assert parts.sessions.get(NODE) is None


async def test_a_handler_cancelled_while_its_session_closes_still_stores_the_node_offline(
    parts: BalancerParts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other replicas route by the stored record, so a close cut short must not leave it online."""
    store = parts.store
    entered, gate = asyncio.Event(), asyncio.Event()
    real = store.detach_node

    async def parked(*args: Any, **kwargs: Any) -> bool:
        entered.set()
        await gate.wait()
        return await real(*args, **kwargs)

    async def hello_then_gone() -> AsyncIterator[protocol.NodeMessage]:
        yield protocol.Hello(NODE)

    async def handle() -> None:
        async with aclosing(protocol.serve(parts, hello_then_gone())) as outgoing:
            async for _ in outgoing:
                pass

    monkeypatch.setattr(store, "detach_node", parked)
    handler = asyncio.create_task(handle())
    await asyncio.wait_for(entered.wait(), 5)
    handler.cancel()  # grpc cancels the handler of a stream that ended
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(handler, 5)

    node = await store.get_node(NODE)
    assert node is not None and node.state is NodeState.OFFLINE and node.replica_id == ""
