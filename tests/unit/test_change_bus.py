"""The change bus: each owner of state follows what another replica changed, and the replicas carry
changes between them in the notice format every version reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from balancer.catalog import Catalog
from balancer.changes import ModelChanged, NodeDrained, NodeLoadChanged, NodeRemoved, decode
from balancer.fleet.sessions import NodeSessions
from balancer.fleet.view import Fleet, NodeInfo, NodeLoad
from balancer.origin import Origin
from balancer.replicas import CHANNEL, Replicas
from balancer.store import Store
from common.config import BalancerConfig
from common.types import ModelOnNode, ModelState, NodeState
from tests.fixtures.eventually import eventually_async
from tests.unit.test_store import make_model, make_node


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'llmlb.db'}")
    yield opened
    await opened.close()


async def test_each_owner_follows_what_another_replica_changed(store: Store, tmp_path: Path) -> None:
    fleet = Fleet()
    replicas = Replicas(store, database_url="sqlite+aiosqlite:///unused.db", timeout_s=3.0)
    origin = Origin(BalancerConfig(home=tmp_path))
    catalog = Catalog(store, origin, replicas.bus)
    catalog.on_gone(fleet.forget_model)
    sessions = NodeSessions(store, fleet, replicas, heartbeat_timeout_s=3.0)
    await store.upsert_model(make_model("gone-model"))
    await catalog.load()
    for node_id in ("held", "removed"):
        await store.upsert_node(make_node(node_id, state=NodeState.OFFLINE))
        fleet.registered(NodeInfo(node_id, "127.0.0.1:1"))
    session = await sessions.open("held")
    fleet.report(ModelOnNode("held", "gone-model", ModelState.READY, 1, 1))
    fleet.attached_elsewhere(
        NodeInfo("elsewhere", "127.0.0.1:2"), "other-replica", models=[], load=NodeLoad(), draining=False
    )
    await store.delete_model("gone-model")  # as another replica deleted it

    await replicas.bus.deliver(ModelChanged("gone-model"))
    await replicas.bus.deliver(NodeDrained("held"))
    await replicas.bus.deliver(NodeLoadChanged("elsewhere", 3, 2))
    await replicas.bus.deliver(NodeRemoved("removed"))

    assert not catalog.knows("gone-model") and fleet.model_nodes("gone-model") == []
    assert session.draining and fleet.is_draining("held")  # a heartbeat saying otherwise will not undo it
    load = fleet.load("elsewhere")
    assert load is not None and (load.active_requests, load.queued_requests) == (3, 2)
    assert fleet.info("removed") is None
    await sessions.close_all()
    await origin.close()


def test_a_load_notice_reads_as_the_older_replicas_wrote_it_and_a_garbled_one_is_dropped() -> None:
    assert NodeLoadChanged("n1", 3, 2).subject() == "n1 3 2"  # what older replicas read
    assert decode("load", "n1 3 2") == NodeLoadChanged("n1", 3, 2)
    assert decode("load", "n1") == NodeLoadChanged("n1", 0, 0)
    assert decode("load", "n1 three 2") is None
    assert decode("teleport", "n1") is None  # a kind from a newer replica: the resync covers it


async def test_a_replica_follows_an_older_replicas_notices_and_a_garbled_one_does_not_stop_its_feed(
    postgres_url: str,
) -> None:
    stores = [await Store.open(postgres_url), await Store.open(postgres_url)]
    a, b = (Replicas(s, database_url=postgres_url, timeout_s=3.0) for s in stores)
    heard: list[NodeLoadChanged] = []

    async def follow(change: NodeLoadChanged) -> None:
        heard.append(change)

    b.bus.subscribe(NodeLoadChanged, follow)
    await a.start()
    await b.start()
    dsn = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    older = await asyncpg.connect(dsn)
    try:
        await older.execute("SELECT pg_notify($1, $2)", CHANNEL, "older-replica load n1 x y")
        await older.execute("SELECT pg_notify($1, $2)", CHANNEL, "older-replica load n1 5 1")
        await a.bus.publish(NodeLoadChanged("n2", 3, 2))

        async def both_heard() -> bool:
            return len(heard) >= 2

        await eventually_async(both_heard, within=5.0, what="both load notices followed")
        assert heard == [NodeLoadChanged("n1", 5, 1), NodeLoadChanged("n2", 3, 2)]
    finally:
        await older.close()
        for replica in (a, b):
            await replica.stop()
        for store in stores:
            await store.close()
