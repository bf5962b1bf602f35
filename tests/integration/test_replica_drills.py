"""Replica drills: two `llmlb serve` processes on one PostgreSQL, two real `xllm` nodes that know both,
and clients spread over both replicas through both doors; one replica is killed, or both are
restarted one after the other, while the clients keep sending.

The clients (``devkit.replica_clients``) do what a client of replicas does (see docs/operations.md,
"Production: replicas on PostgreSQL"): each has a home replica, and a request whose connection is
refused or lost before an answer is sent again, with the same request id, to the other replica. Every
retry is counted. ``bench/bench_replica_drill.py`` runs the kill drill at full scale. What the drills assert:
every request gets exactly one answer, the right one; a killed replica's nodes are held by the other
within 2 s; a restarted replica serves again.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from devkit.fake_hub import FakeHub
from devkit.load_clients import GRPC, HTTP, TIMEOUT, summary
from devkit.model_files import CACHE, ModelFiles
from devkit.replica_clients import ReplicaClients
from tests.fixtures.eventually import eventually, eventually_async
from tests.integration.conftest import BalancerProcess, NodeProcess, wait_online

pytestmark = pytest.mark.slow
GEMMA = "gemma-3-270m"
COUNTING = "One, two, three, four,"  # gemma continues it with "five"
HELD_ELSEWHERE_S = 2.0  # a killed replica's nodes are held by the other replica within this long


def drill_clients(a: BalancerProcess, b: BalancerProcess, key: str) -> ReplicaClients:
    """Clients of A (replica 0) and B (replica 1) asking gemma to count on, 3 tokens a request."""
    return ReplicaClients([(a.http_url, a.address), (b.http_url, b.address)], key, GEMMA, COUNTING)


def check_every_request_answered_once(clients: ReplicaClients) -> None:
    """Nothing lost, nothing answered twice, every answer the right one for its own request."""
    outcomes = [o for a in clients.asks for o in a.attempts]
    print("outcomes:", summary(outcomes), "retries:", clients.retries())
    assert not [o for o in outcomes if o.error == TIMEOUT], "a request hung past its deadline"
    unanswered = [a for a in clients.asks if a.answer is None]
    assert not unanswered, [[(o.error, o.detail) for o in a.attempts] for a in unanswered[:5]]
    twice = [a.marker for a in clients.asks if sum(o.answered for o in a.attempts) != 1]
    assert not twice, twice[:5]
    assert len({a.marker for a in clients.asks}) == len(clients.asks)
    for ask in clients.asks:
        answer = ask.answer
        assert answer is not None and answer.matched, answer
        assert "five" in answer.text.lower(), answer


@pytest.fixture
def fleet(
    tmp_path: Path, postgres_url: str, hub: FakeHub, gemma: ModelFiles
) -> Iterator[tuple[list[BalancerProcess], list[NodeProcess], str]]:
    """Two replicas on one fresh PostgreSQL database and two gemma nodes that know both (A first)."""
    env = {"LLMLB_DATABASE_URL": postgres_url, "HF_ENDPOINT": hub.url, "LLMLB_LOG_FORMAT": "json"}
    a = BalancerProcess(tmp_path / "replica-a", env)
    a.start()
    b = BalancerProcess(tmp_path / "replica-b", env)
    b.home.mkdir(parents=True)
    (b.home / "admin-key").write_text(a.admin_key + "\n")  # the shared store's admin key, for the test
    b.start()
    key = a.registry.CreateKey(rpb.CreateKeyRequest(name="drill", scopes=[pb.SCOPE_API])).secret
    node_env = {"HF_ENDPOINT": hub.url, "XLLM_LOG_FORMAT": "json", **a.node_env()}
    nodes = [
        NodeProcess(tmp_path / f"node{i}", f"{a.address},{b.address}", node_env, ["--shared-dir", str(CACHE)])
        for i in range(2)
    ]
    try:
        for node in nodes:
            node.start()
        wait_online(a, *nodes, within=60)
        wait_online(b, *nodes, within=10)
        yield [a, b], nodes, key
    finally:
        for node in nodes:
            node.stop()
        for replica in (a, b):
            replica.stop()


def holders(replica: BalancerProcess) -> dict[str, str]:
    """Which replica holds each online node's session, as ``replica`` lists it."""
    listed = replica.registry.ListNodes(rpb.ListNodesRequest(), timeout=10).nodes
    return {n.id: n.replica for n in listed if n.state == pb.NODE_STATE_ONLINE}


async def run_clients(
    clients: ReplicaClients, drill: Callable[[], Awaitable[None]], per_door_and_home: int = 4
) -> None:
    """Keeps 16 clients (both doors, both home replicas) sending while ``drill`` runs."""
    stop = asyncio.Event()
    senders = [
        asyncio.create_task(clients.keep_asking(door, home, f"{door}-{home}-{i}", stop))
        for door in (HTTP, GRPC)
        for home in (0, 1)
        for i in range(per_door_and_home)
    ]
    try:
        await drill()
    finally:
        stop.set()
        await asyncio.gather(*senders)


async def answered(clients: ReplicaClients, replica: int, since: float, count: int, what: str) -> None:
    """Waits (at most 60 s) until ``replica`` has answered ``count`` requests sent after ``since``."""

    async def enough() -> bool:
        return clients.answered_on(replica, since) >= count

    await eventually_async(enough, 60, what, every=0.1, describe=clients.describe)


async def test_a_replica_killed_under_load_loses_no_request_and_its_nodes_are_held_by_the_other(
    fleet: tuple[list[BalancerProcess], list[NodeProcess], str],
) -> None:
    (a, b), nodes, key = fleet
    ids = {n.node_id for n in nodes}
    replica_a = set(holders(a).values())
    assert set(holders(a)) == ids and len(replica_a) == 1  # both nodes attached to A, the first address
    clients = drill_clients(a, b, key)
    timings: dict[str, float] = {}

    async def drill() -> None:
        await answered(clients, 0, 0.0, 10, "answers from A before the kill")
        await answered(clients, 1, 0.0, 10, "answers from B before the kill")
        killed = time.monotonic()
        await asyncio.to_thread(a.stop, signal.SIGKILL)

        def held_by_b() -> bool:
            held = holders(b)
            return set(held) == ids and not set(held.values()) & replica_a

        await asyncio.to_thread(eventually, held_by_b, 30, "A's nodes held by B", every=0.05)
        timings["held_by_b_s"] = time.monotonic() - killed
        await answered(clients, 1, killed, 20, "answers from B while A is down")
        await asyncio.sleep(3)  # clients homed on A keep meeting a closed port meanwhile

        restarted = time.monotonic()
        await asyncio.to_thread(a.start)
        await answered(clients, 0, restarted, 10, "answers from A after its restart")
        await asyncio.sleep(1)

    try:
        await run_clients(clients, drill)
    finally:
        await clients.close()
    print(f"A's nodes held by B {timings.get('held_by_b_s', -1):.3f} s after the kill")
    check_every_request_answered_once(clients)
    assert clients.retries() > 0  # the kill was felt: requests homed on A went to B meanwhile
    assert timings["held_by_b_s"] <= HELD_ELSEWHERE_S


async def test_a_rolling_restart_of_both_replicas_fails_no_request_of_a_retrying_client(
    fleet: tuple[list[BalancerProcess], list[NodeProcess], str],
) -> None:
    (a, b), _nodes, key = fleet
    clients = drill_clients(a, b, key)

    async def drill() -> None:
        for index, replica in enumerate((a, b)):
            since = time.monotonic()
            await answered(clients, index, since, 4, f"answers from replica {index} before its restart")
            await asyncio.to_thread(replica.stop, signal.SIGTERM)  # a graceful stop, as a deploy does
            await asyncio.sleep(1)
            back = time.monotonic()
            await asyncio.to_thread(replica.start)
            await answered(clients, index, back, 4, f"answers from replica {index} after its restart")

    try:
        # Half the kill drill's clients: a graceful stop waits for the calls in flight, and two gemma
        # nodes on two cores answer about 2 a second, so 16 clients made each restart last a minute.
        await run_clients(clients, drill, per_door_and_home=2)
    finally:
        await clients.close()
    check_every_request_answered_once(clients)
