"""Two balancer replicas on one PostgreSQL: each routes to every node, and what either changes reaches
the other through the database within the promised time.

Both replicas run in this process (each with its own gRPC and HTTP ports, its own home directory and
nothing shared but the database); nodes are echo nodes, each attached to one replica. Where a replica
is killed outright, the replicas are `llmlb serve` processes instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from balancer.server import Balancer, start
from common.channels import open_channel
from common.config import load_balancer_config
from common.inference import ChatMessage
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.prefixes import chat_prefixes
from devkit.echo_node import EchoNode
from devkit.fake_hub import FakeHub, gguf_blob
from devkit.postgres import PostgresServer
from tests.integration.conftest import BalancerProcess

pytestmark = pytest.mark.timeout(120)
PROPAGATION_S = 1.0  # a change made on one replica is seen on the other within this long
NODE_GONE_S = 2.0  # a dead node is out of rotation on every replica within this long


@dataclass
class Replica:
    balancer: Balancer
    http: httpx.AsyncClient  # the OpenAI door, as the admin
    channel: grpc.aio.Channel  # the gRPC door, as the admin

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.balancer.port}"

    @property
    def registry(self) -> rgrpc.RegistryAsyncStub:
        stub: rgrpc.RegistryAsyncStub = rgrpc.RegistryStub(self.channel)  # type: ignore[assignment]
        return stub


async def start_replica(home: Path, database_url: str, hub: FakeHub, admin: str = "") -> Replica:
    env = {
        "LLMLB_HOME": str(home),
        "LLMLB_DATABASE_URL": database_url,
        "LLMLB_GRPC_LISTEN": "127.0.0.1:0",
        "LLMLB_HTTP_LISTEN": "127.0.0.1:0",
        "LLMLB_LOG_LEVEL": "warning",
        "HF_ENDPOINT": hub.url,
    }
    config = load_balancer_config(home=home, env=env)
    balancer = await start(config)
    key = admin or config.admin_key_file.read_text().strip()
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{balancer.http_port}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    return Replica(balancer, http, open_channel(f"127.0.0.1:{balancer.port}", api_key=key))


@pytest.fixture
async def replicas(tmp_path: Path, postgres_url: str, hub: FakeHub) -> AsyncIterator[tuple[Replica, Replica]]:
    a = await start_replica(tmp_path / "a", postgres_url, hub)
    b = await start_replica(tmp_path / "b", postgres_url, hub, admin_key(a))
    yield a, b
    for replica in (a, b):
        await replica.http.aclose()
        await replica.channel.close(None)
        await replica.balancer.stop()


def admin_key(replica: Replica) -> str:
    return str(replica.http.headers["Authorization"]).removeprefix("Bearer ")


async def within(seconds: float, check: Callable[[], Awaitable[bool]], what: str) -> float:
    """Polls ``check`` until it holds; fails after ``seconds``. How long it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def node_states(replica: Replica) -> dict[str, str]:
    reply = await replica.http.get("/v0/nodes")
    assert reply.status_code == 200, reply.text
    return {n["id"]: n["state"] for n in reply.json()["data"]}


async def chat(replica: Replica, model: str = "gemma-3-270m", key: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    return await replica.http.post("/v1/chat/completions", json=body, headers=headers)


@contextlib.asynccontextmanager
async def one_node_on_each(
    replicas: tuple[Replica, Replica], delay_s: float = 0.0
) -> AsyncIterator[tuple[EchoNode, EchoNode]]:
    """Echo nodes ``on-a`` (attached to A) and ``on-b`` (to B), once each replica lists both online."""
    a, b = replicas
    on_a = EchoNode(a.address, api_key=admin_key(a), node_id="on-a", delay_s=delay_s)
    on_b = EchoNode(b.address, api_key=admin_key(b), node_id="on-b", delay_s=delay_s)
    await on_a.start()
    await on_b.start()
    try:

        async def both_online() -> bool:
            wanted = {"on-a": "online", "on-b": "online"}
            return await node_states(a) == wanted and await node_states(b) == wanted

        await within(PROPAGATION_S, both_online, "each replica lists both nodes online")
        yield on_a, on_b
    finally:
        await on_a.stop()
        await on_b.stop()


async def test_every_replica_routes_to_every_node_and_a_dead_node_leaves_both_within_two_seconds(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with one_node_on_each(replicas, delay_s=0.2) as (on_a, on_b):
        # Each replica spreads its requests over both nodes, the one attached to the other included.
        for replica in (a, b):
            before = (on_a.total_calls, on_b.total_calls)
            replies = await asyncio.gather(*(chat(replica) for _ in range(10)))  # 10 at once
            assert [r.status_code for r in replies] == [200] * 10, [r.text for r in replies]
            assert on_a.total_calls > before[0] and on_b.total_calls > before[1]

        await on_b.stop()  # the node dies: its session on B breaks

        async def gone_everywhere() -> bool:
            return (await node_states(a))["on-b"] == "offline" and (await node_states(b))["on-b"] == "offline"

        took = await within(NODE_GONE_S, gone_everywhere, "the dead node is out of rotation on both")
        print(f"dead node out of rotation on both replicas after {took:.3f} s")
        calls = on_b.total_calls
        for replica in (a, b):
            for _ in range(5):
                assert (await chat(replica)).status_code == 200
        assert on_b.total_calls == calls


async def test_a_model_deleted_through_one_replica_is_deleted_by_nodes_on_the_other_within_a_second(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with EchoNode(b.address, api_key=admin_key(b), node_id="on-b", models=["gemma-3-270m"]) as node:
        reply = await a.http.delete("/v1/models/gemma-3-270m")
        assert reply.status_code == 200, reply.text

        async def deleted() -> bool:
            return "gemma-3-270m" not in node.models

        took = await within(PROPAGATION_S, deleted, "the node on B deleted its copy")
        print(f"delete through A reached a node on B after {took:.3f} s")
        listed = (await b.http.get("/v1/models")).json()["data"]
        assert "gemma-3-270m" not in [m["id"] for m in listed]
        refused = await chat(b)
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"]["code"] == "model_not_found"


async def test_a_key_made_on_one_replica_opens_the_other_and_a_revocation_there_holds_within_a_second(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with EchoNode(a.address, api_key=admin_key(a), node_id="on-a"):
        made = await a.registry.CreateKey(rpb.CreateKeyRequest(name="app", scopes=[pb.SCOPE_API]))
        ok = await chat(b, key=made.secret)  # B has never seen it; it is in the shared store
        assert ok.status_code == 200, ok.text
        secret = made.secret

        await a.registry.RevokeKey(rpb.RevokeKeyRequest(key=made.key.id))

        async def refused_on_b() -> bool:
            return (await chat(b, key=secret)).status_code == 401

        took = await within(PROPAGATION_S, refused_on_b, "the revoked key is refused on B")
        print(f"revocation on A held on B after {took:.3f} s")


async def test_revoking_a_nodes_key_on_one_replica_cuts_the_node_off_and_its_fleet_token_on_the_other(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    made = await a.registry.CreateKey(rpb.CreateKeyRequest(name="on-b", scopes=[pb.SCOPE_NODE]))
    node = EchoNode(b.address, api_key=made.secret, node_id="on-b")  # its session is on B
    await node.start()
    try:
        kept = b.balancer.parts.fleet_token
        await within(PROPAGATION_S, lambda: _online_on(a, "on-b"), "on-b online on A")
        await a.registry.RevokeKey(rpb.RevokeKeyRequest(key=made.key.id))

        async def cut_off() -> bool:
            return not await _online_on(a, "on-b") and not await _online_on(b, "on-b")

        took = await within(PROPAGATION_S, cut_off, "on-b out of rotation on both replicas")
        print(f"revocation on A cut the node on B off after {took:.3f} s")
        assert not b.balancer.parts.fleet_tokens.accepts(kept) and not a.balancer.parts.fleet_tokens.accepts(
            kept
        )
        assert b.balancer.parts.fleet_token == a.balancer.parts.fleet_token  # B took up A's rotation
        await node.end_session()
        assert node.ended_with is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await node.stop()


async def _online_on(replica: Replica, node_id: str) -> bool:
    return (await node_states(replica)).get(node_id) == "online"


async def test_a_model_registered_and_pulled_through_one_replica_is_routable_on_the_other_within_a_second(
    replicas: tuple[Replica, Replica], hub: FakeHub
) -> None:
    a, b = replicas
    hub.add_repo("acme/fresh", {"fresh.gguf": gguf_blob(1024 * 1024, 7)})
    async with EchoNode(b.address, api_key=admin_key(b), node_id="on-b", models=[]) as node:
        registered = await a.http.post("/v0/models", json={"repo_id": "acme/fresh"})
        assert registered.status_code == 201, registered.text
        model_id = registered.json()["id"]

        async def listed_on_b() -> bool:
            models = (await b.http.get("/v1/models")).json()["data"]
            return model_id in [m["id"] for m in models]

        took = await within(PROPAGATION_S, listed_on_b, "the model registered on A is listed on B")
        print(f"registration on A listed on B after {took:.3f} s")

        pulled = await a.registry.PullModel(rpb.PullModelRequest(model_id=model_id))
        assert list(pulled.node_ids) == ["on-b"]  # A sees the node held by B

        async def routable_on_b() -> bool:
            return (await chat(b, model_id)).status_code == 200

        took = await within(PROPAGATION_S + 1.0, routable_on_b, "the pulled model answers through B")
        assert model_id in node.models
        assert (await chat(a, model_id)).status_code == 200


async def test_a_node_drained_and_removed_through_one_replica_leaves_the_other(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with EchoNode(b.address, api_key=admin_key(b), node_id="on-b") as node:
        await a.registry.DrainNode(rpb.DrainNodeRequest(node_id="on-b"))

        async def draining_everywhere() -> bool:
            states = [(await node_states(r))["on-b"] for r in (a, b)]
            return node.draining and states == ["draining", "draining"]

        await within(PROPAGATION_S, draining_everywhere, "the node on B drains, and both say so")

        await a.registry.RemoveNode(rpb.RemoveNodeRequest(node_id="on-b"))

        async def gone() -> bool:
            listed = [await node_states(r) for r in (a, b)]
            return all("on-b" not in nodes for nodes in listed)

        await within(PROPAGATION_S, gone, "the removed node is listed by neither replica")
    assert node.ended_with is grpc.StatusCode.NOT_FOUND  # B ended its session: removed


async def test_a_database_restart_under_load_loses_no_request_and_the_replicas_follow_each_other_after(
    tmp_path: Path, restartable_postgres: PostgresServer, hub: FakeHub
) -> None:
    """While PostgreSQL is down both replicas keep routing from memory; when it is back, each one's
    feed reconnects and changes made on one reach the other again."""
    url = restartable_postgres.url(restartable_postgres.create_database())
    a = await start_replica(tmp_path / "a", url, hub)
    b = await start_replica(tmp_path / "b", url, hub, admin_key(a))
    on_a = EchoNode(a.address, api_key=admin_key(a), node_id="on-a")
    on_b = EchoNode(b.address, api_key=admin_key(b), node_id="on-b")
    stop = asyncio.Event()
    outcomes: list[int] = []

    async def client(replica: Replica) -> None:
        while not stop.is_set():
            outcomes.append((await chat(replica)).status_code)
            await asyncio.sleep(0.02)

    try:
        await on_a.start()
        await on_b.start()
        made = await a.registry.CreateKey(rpb.CreateKeyRequest(name="app", scopes=[pb.SCOPE_API]))
        assert (await chat(b, key=made.secret)).status_code == 200
        clients = [asyncio.create_task(client(r)) for r in (a, b, a, b)]
        await asyncio.sleep(1)
        await asyncio.to_thread(restartable_postgres.halt)
        during = len(outcomes)
        await asyncio.sleep(4)  # longer than a node's heartbeat timeout and a replica's resync
        answered_during = len(outcomes) - during
        await asyncio.to_thread(restartable_postgres.resume)
        await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*clients)

        assert answered_during > 20  # the outage was served, not waited out
        assert outcomes and set(outcomes) == {200}, sorted(set(outcomes))
        assert all(s == "online" for s in (await node_states(a)).values())

        async def revoked_on_b() -> bool:
            try:
                await a.registry.RevokeKey(rpb.RevokeKeyRequest(key=made.key.id))
            except grpc.aio.AioRpcError:  # A's pool still finding its feet: try again
                return False
            return True

        await within(10, revoked_on_b, "a revocation through A once the database is back")

        async def refused_on_b() -> bool:
            return (await chat(b, key=made.secret)).status_code == 401

        took = await within(PROPAGATION_S, refused_on_b, "the revocation on A holds on B after the outage")
        print(f"after the database restart, a revocation on A held on B after {took:.3f} s")
    finally:
        stop.set()
        for node in (on_a, on_b):
            await node.stop()
        for replica in (a, b):
            await replica.http.aclose()
            await replica.channel.close(None)
            await replica.balancer.stop()


async def test_a_replica_stopped_gracefully_hands_its_nodes_over_instead_of_dropping_them(
    tmp_path: Path, postgres_url: str, hub: FakeHub
) -> None:
    """A rolling restart: the stopping replica's nodes are alive and about to attach elsewhere, so the
    other replica keeps routing to them; one that attaches nowhere is offline after the timeout."""
    a = await start_replica(tmp_path / "a", postgres_url, hub)
    b = await start_replica(tmp_path / "b", postgres_url, hub, admin_key(a))
    node = EchoNode(b.address, api_key=admin_key(b), node_id="on-b")
    try:
        await node.start()

        async def held_by_b_on_a() -> bool:
            return (await node_states(a)).get("on-b") == "online"

        await within(PROPAGATION_S, held_by_b_on_a, "A routes to the node B holds")
        await b.http.aclose()
        await b.channel.close(None)
        await b.balancer.stop()  # SIGTERM's path: a graceful stop

        # This echo node does not attach elsewhere by itself (a real node does within a second), so
        # it stays handed over: A keeps routing to it for the heartbeat timeout, then lets it go.
        stopped = time.monotonic()
        for _ in range(5):
            assert (await chat(a)).status_code == 200
        assert time.monotonic() - stopped < 2.0  # all within the handover, not after it

        async def offline_on_a() -> bool:
            return (await node_states(a)).get("on-b") == "offline"

        timeout_s = a.balancer.config.heartbeat_timeout_ms / 1000
        took = await within(timeout_s + 3.0, offline_on_a, "the node nobody took over is offline")
        assert took >= timeout_s - 1.0
        refused = await chat(a)
        assert refused.status_code == 503, refused.text
    finally:
        await node.stop()
        await a.http.aclose()
        await a.channel.close(None)
        await a.balancer.stop()


async def test_a_replica_without_the_nodes_session_routes_a_conversations_later_turn_to_its_node(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with one_node_on_each(replicas):
        hit_counter = b.balancer.parts.metrics.route_outcomes.labels("cache-aware", "hit")
        hits_before = hit_counter._value.get()
        followed = 0
        for i in range(20):
            if followed == 3:
                break
            # The affinity key only steers the first turn onto the node held by A; the later turn
            # goes to B without it, so only the prefixes A's node reported can lead B there.
            first = [{"role": "user", "content": f"Tell me about topic {i}."}]
            reply = await a.http.post(
                "/v1/chat/completions",
                json={"model": "gemma-3-270m", "messages": first, "prompt_cache_key": f"conv-{i}"},
            )
            assert reply.status_code == 200, reply.text
            if reply.headers["x-llmlb-node"] != "on-a":
                continue
            answer = reply.json()["choices"][0]["message"]["content"]
            answered = chat_prefixes(
                [ChatMessage("user", first[0]["content"]), ChatMessage("assistant", answer)]
            )

            async def b_knows(held: int = answered[-1].hash) -> bool:
                return held in b.balancer.parts.fleet.prefixes("on-a", "gemma-3-270m")

            await within(PROPAGATION_S + 1, b_knows, "B knows what on-a holds")
            later = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And?"}]
            reply = await b.http.post(
                "/v1/chat/completions", json={"model": "gemma-3-270m", "messages": later}
            )
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-llmlb-node"] == "on-a"
            assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
            followed += 1
        assert followed == 3
        assert hit_counter._value.get() == hits_before + 3  # led there by what it knew, not by chance


async def acting(replica: Replica) -> bool:
    reply = await replica.http.get("/v0/events")
    assert reply.status_code == 200, reply.text
    return bool(reply.json()["acting"])


async def test_one_replica_schedules_a_deployment_set_on_either_is_seen_on_both_and_another_takes_over(
    tmp_path: Path, postgres_url: str, hub: FakeHub
) -> None:
    a = await start_replica(tmp_path / "a", postgres_url, hub)
    b = await start_replica(tmp_path / "b", postgres_url, hub, admin_key(a))
    replicas = [a, b]
    try:

        async def exactly_one_acts() -> bool:
            return [await acting(r) for r in replicas].count(True) == 1

        await within(3.0, exactly_one_acts, "one replica holds the scheduler's lease")
        for _ in range(5):  # and it stays one, pass after pass
            assert await exactly_one_acts()
            await asyncio.sleep(0.2)

        put = await b.http.put(
            "/v0/models/gemma-3-270m/deployment", json={"copies": 2, "selector": {"zone": "a"}}
        )
        assert put.status_code == 200, put.text
        assert put.json()["copies"] == 2 and put.json()["ready_copies"] == 0
        seen = await a.http.get("/v0/models/gemma-3-270m/deployment")
        assert seen.status_code == 200 and seen.json()["selector"] == {"zone": "a"}

        holder = a if await acting(a) else b
        other = b if holder is a else a
        await holder.http.aclose()
        await holder.channel.close(None)
        await holder.balancer.stop()  # gives the lease up: the other takes it on its next pass
        replicas.remove(holder)
        took = await within(3.0, lambda: acting(other), "the other replica takes the scheduler over")
        print(f"\nthe scheduler moved to the other replica in {took:.2f} s")
        gone = await other.http.delete("/v0/models/gemma-3-270m/deployment")
        assert gone.status_code == 200 and gone.json() == {"model_id": "gemma-3-270m", "deleted": True}
        assert (await other.http.get("/v0/models/gemma-3-270m/deployment")).status_code == 404
    finally:
        for replica in replicas:
            await replica.http.aclose()
            await replica.channel.close(None)
            await replica.balancer.stop()


async def test_the_scheduler_replica_killed_outright_is_replaced_by_the_other_within_the_lease(
    tmp_path: Path, postgres_url: str, hub: FakeHub
) -> None:
    """A SIGKILL gives nothing up: the other replica acts once the dead one's lease lapses, within the
    lease and one pass of the kill, and not before the lease could have lapsed."""
    lease_s, interval_s = 2.0, 0.25
    one_pass_s = interval_s + 0.75  # the wait between passes and what a pass may take on a busy machine
    env = {
        "LLMLB_DATABASE_URL": postgres_url,
        "HF_ENDPOINT": hub.url,
        "LLMLB_SCHEDULE_LEASE": str(lease_s),
        "LLMLB_SCHEDULE_INTERVAL": str(interval_s),
    }
    a = BalancerProcess(tmp_path / "a", env)
    b = BalancerProcess(tmp_path / "b", env)
    a.start()
    b.home.mkdir(parents=True)
    (b.home / "admin-key").write_text(a.admin_key + "\n")  # the shared store's admin key, for the test
    b.start()
    headers = {"Authorization": f"Bearer {a.admin_key}"}
    clients = {p: httpx.AsyncClient(base_url=p.http_url, headers=headers, timeout=5) for p in (a, b)}
    try:

        async def acts(replica: BalancerProcess) -> bool:
            reply = await clients[replica].get("/v0/events")
            assert reply.status_code == 200, reply.text
            return bool(reply.json()["acting"])

        async def exactly_one_acts() -> bool:
            return [await acts(a), await acts(b)].count(True) == 1

        await within(5.0, exactly_one_acts, "one replica holds the scheduler's lease")
        holder, other = (a, b) if await acts(a) else (b, a)
        killed = time.monotonic()
        holder.stop(signal.SIGKILL)  # no lease given up: it lapses
        await within(lease_s + one_pass_s, lambda: acts(other), "the other replica takes the scheduler over")
        took = time.monotonic() - killed
        print(f"\nthe scheduler acted on the other replica {took:.2f} s after the kill (lease {lease_s} s)")
        assert lease_s - one_pass_s < took <= lease_s + one_pass_s  # it waited for the lease to lapse
        events = (await clients[other].get("/v0/events")).json()["data"]
        assert [e["reason"] for e in events if e["action"] == "lease"][-1] == "took the scheduler's lease"
    finally:
        for client in clients.values():
            await client.aclose()
        for replica in (a, b):
            replica.stop()
