"""Node identity and the fleet token, as a user sees them.

A node id belongs to the key that registered it: another node key cannot take it, nor move an online
node's address, nor open its session; a key bound to a node id registers only that id and takes it
over. Node ids that would break a header are refused, and the ``x-llmlb-node`` header names the
registered node whatever the node writes in its answer. Fleet tokens expire and rotate: a token kept
after its key is revoked opens nothing within seconds, while nodes keep working across rotations.
The store and the admin key are readable by their owner only.

The in-process cases run one balancer with both doors and echo nodes; the token cases run real
``llmlb serve`` and ``xllm serve`` processes, whose doors check the token.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from balancer.fleet.token import SECRET_NAME, derive
from common.channels import bearer_metadata
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.types import Scope
from devkit.echo_node import EchoNode
from devkit.fake_hub import FakeHub
from tests.fixtures.doors import Doors, grpc_error, open_doors
from tests.fixtures.eventually import eventually, eventually_async
from tests.integration.conftest import BalancerProcess, NodeProcess, online, sync_channel, wait_online

pytestmark = pytest.mark.timeout(120)
MODEL = "gemma-3-270m"
NodeFactory = Callable[..., NodeProcess]


def register(node_id: str, address: str) -> rpb.RegisterNodeRequest:
    return rpb.RegisterNodeRequest(
        node_id=node_id, address=address, backends=[pb.BACKEND_CPU], runtimes=["echo"], version="test"
    )


async def node_key(doors: Doors, name: str, node_id: str = "") -> str:
    _, secret = await doors.balancer.parts.keys.create(name, [Scope.NODE], node_id=node_id)
    return secret


async def chat_answered_by(doors: Doors) -> str:
    reply = await doors.http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "one two"}]},
        headers=doors.headers(Scope.API),
    )
    assert reply.status_code == 200, reply.text
    return reply.headers["x-llmlb-node"]


async def test_a_second_node_key_cannot_take_over_an_online_node_which_keeps_its_traffic(
    tmp_path: Path,
) -> None:
    async with open_doors(tmp_path / "balancer") as doors:
        address = f"127.0.0.1:{doors.balancer.port}"
        async with EchoNode(address, api_key=doors.secrets[Scope.NODE], node_id="echo-1") as real:
            thief = bearer_metadata(await node_key(doors, "thief"))
            code, _ = await grpc_error(
                doors.registry.RegisterNode(register("echo-1", "127.0.0.1:9"), metadata=thief)
            )
            assert code is grpc.StatusCode.PERMISSION_DENIED
            code, error = await grpc_error(  # even at its address: the id is not the thief's
                doors.registry.RegisterNode(register("echo-1", real.address), metadata=thief)
            )
            assert code is grpc.StatusCode.PERMISSION_DENIED and "another key" in error.message
            # The same key as the node's, from another address, cannot move it while it is online.
            same = doors.metadata(Scope.NODE)
            code, error = await grpc_error(
                doors.registry.RegisterNode(register("echo-1", "127.0.0.1:9"), metadata=same)
            )
            assert code is grpc.StatusCode.PERMISSION_DENIED and "online at another address" in error.message
            # Nor can the thief open the node's session and take its place.
            hello = rpb.NodeMessage(hello=rpb.NodeHello(node_id="echo-1"))
            code, _ = await grpc_error(doors.registry.NodeSession(iter([hello]), metadata=thief))
            assert code is grpc.StatusCode.PERMISSION_DENIED

            assert await chat_answered_by(doors) == "echo-1"
            assert real.calls["chat"] == 1
            nodes = (await doors.registry.ListNodes(rpb.ListNodesRequest(), metadata=same)).nodes
            assert [(n.id, n.address, n.state) for n in nodes] == [
                ("echo-1", real.address, pb.NODE_STATE_ONLINE)
            ]


async def test_a_key_bound_to_a_node_id_registers_only_that_id_and_an_admin_reassigns_it(
    tmp_path: Path,
) -> None:
    async with open_doors(tmp_path / "balancer") as doors:
        address = f"127.0.0.1:{doors.balancer.port}"
        first = EchoNode(address, api_key=doors.secrets[Scope.NODE], node_id="echo-1")
        await first.start()
        await first.stop()  # offline: its id still belongs to the fleet's node key

        created = await doors.http.post(
            "/v0/keys",
            json={"name": "echo-1 only", "scopes": ["node"], "node_id": "echo-1"},
            headers=doors.headers(Scope.ADMIN),
        )
        assert created.status_code == 201, created.text
        assert created.json()["node_id"] == "echo-1"
        bound = bearer_metadata(created.json()["secret"])
        code, error = await grpc_error(
            doors.registry.RegisterNode(register("echo-2", "127.0.0.1:9"), metadata=bound)
        )
        assert code is grpc.StatusCode.PERMISSION_DENIED and "bound to node 'echo-1'" in error.message

        # The bound key is the admin's re-assignment: it takes echo-1 over, and the old key loses it.
        async with EchoNode(address, api_key=created.json()["secret"], node_id="echo-1") as moved:
            assert moved.node_id == "echo-1"
            assert await chat_answered_by(doors) == "echo-1" and moved.calls["chat"] == 1
        code, error = await grpc_error(
            doors.registry.RegisterNode(
                register("echo-1", "127.0.0.1:9"), metadata=doors.metadata(Scope.NODE)
            )
        )
        assert code is grpc.StatusCode.PERMISSION_DENIED and "another key" in error.message

        refused = await doors.http.post(  # only a node key is bound, to a valid id
            "/v0/keys",
            json={"name": "bad", "scopes": ["node"], "node_id": "echo\r\n1"},
            headers=doors.headers(Scope.ADMIN),
        )
        assert refused.status_code == 400


async def test_node_ids_that_would_break_a_header_are_refused_and_the_header_names_the_registered_node(
    tmp_path: Path,
) -> None:
    async with open_doors(tmp_path / "balancer") as doors:
        for bad in ("echo-1\r\nx-evil: 1", "echo-1\n", "écho-1", "echo-\u2603"):
            code, error = await grpc_error(
                doors.registry.RegisterNode(register(bad, "127.0.0.1:9"), metadata=doors.metadata(Scope.NODE))
            )
            assert code is grpc.StatusCode.INVALID_ARGUMENT, (bad, error)
        address = f"127.0.0.1:{doors.balancer.port}"
        async with EchoNode(address, api_key=doors.secrets[Scope.NODE], node_id="echo-1") as node:
            for written in ("echo-1\r\nx-evil: 1", "écho-\u2603"):
                node.node_id = written  # what it writes in each answer from now on
                reply = await doors.http.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "one two"}]},
                    headers=doors.headers(Scope.API),
                )
                assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
                assert reply.headers["x-llmlb-node"] == "echo-1" and "x-evil" not in reply.headers
                streamed = await doors.http.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "a b"}]},
                    headers=doors.headers(Scope.API),
                )
                assert streamed.status_code == 200 and "[DONE]" in streamed.text
                assert streamed.headers["x-llmlb-node"] == "echo-1"
            node.node_id = "echo-1"  # its session ends as itself


async def test_revoking_the_key_a_node_registered_with_cuts_it_off_within_seconds(tmp_path: Path) -> None:
    async with open_doors(tmp_path / "balancer") as doors:
        address = f"127.0.0.1:{doors.balancer.port}"
        own = await node_key(doors, "echo-1's own")
        async with (
            EchoNode(address, api_key=own, node_id="echo-1") as cut,
            EchoNode(address, api_key=doors.secrets[Scope.NODE], node_id="echo-2") as kept,
        ):
            revoked = await doors.http.delete(f"/v0/keys/{own[:12]}", headers=doors.headers(Scope.ADMIN))
            assert revoked.status_code == 200, revoked.text
            admin = doors.metadata(Scope.ADMIN)

            async def cut_off() -> bool:
                nodes = (await doors.registry.ListNodes(rpb.ListNodesRequest(), metadata=admin)).nodes
                states = {n.id: n.state for n in nodes}
                assert states["echo-2"] == pb.NODE_STATE_ONLINE
                return states["echo-1"] != pb.NODE_STATE_ONLINE

            await eventually_async(cut_off, within=3, what="echo-1 out of rotation")
            for _ in range(3):
                assert await chat_answered_by(doors) == "echo-2"
            assert cut.calls["chat"] == 0 and kept.calls["chat"] == 3
            await cut.end_session()
            assert cut.ended_with is grpc.StatusCode.UNAUTHENTICATED


async def test_the_store_and_the_admin_key_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    home = tmp_path / "balancer"
    before = os.umask(0o022)  # the usual umask, which would leave new files world-readable
    try:
        async with open_doors(home):
            pass
    finally:
        os.umask(before)
    for path in (home / "llmlb.db", home / "admin-key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# -- real processes: the doors of an xllm node and the balancer's bulk proxy -----------------------------


def fleet_token_now(balancer: BalancerProcess, ttl_s: float) -> str:
    """The token the balancer presents on routed calls now, derived from the secret in its store."""
    with sqlite3.connect(balancer.home / "llmlb.db") as db:
        row = db.execute("SELECT secret FROM balancer_secrets WHERE name = ?", (SECRET_NAME,)).fetchone()
    return derive(row[0], int(time.time() // ttl_s))


def node_door_opens(node: NodeProcess, token: str) -> bool:
    """Whether the node's own Manifest port lets ``token`` in (UNAUTHENTICATED: it does not)."""
    with sync_channel(node.address, token) as channel:
        try:
            mgrpc.ManifestStub(channel).GetBulkEndpoint(mpb.GetBulkEndpointRequest(), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNAUTHENTICATED:
                return False
            raise
    return True


def bulk_opens(port: int, token: str) -> bool:
    """Whether a bulk server (a node's or the balancer's proxy) lets ``token`` in (401: it does not)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/blob?model=no/such-model&file=x.gguf",
        headers={"Authorization": f"Bearer {token}", "Range": "bytes=0-0", "Connection": "close"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code != 401  # let in, then refused for the unknown model


def test_a_fleet_token_kept_after_its_key_is_revoked_opens_nothing_within_seconds(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub, node_factory: NodeFactory
) -> None:
    balancer = balancer_factory(hub)
    node = node_factory(balancer, hub)
    wait_online(balancer, node, within=15)
    taker = balancer.registry.CreateKey(
        rpb.CreateKeyRequest(name="taker", scopes=[pb.SCOPE_NODE]), timeout=10
    )
    with sync_channel(balancer.address, taker.secret) as channel:
        kept = rgrpc.RegistryStub(channel).GetFleetToken(rpb.GetFleetTokenRequest(), timeout=10).token
    proxy_port = balancer.manifest.GetBulkEndpoint(mpb.GetBulkEndpointRequest(), timeout=10).port
    with sync_channel(node.address, kept) as channel:
        node_bulk = mgrpc.ManifestStub(channel).GetBulkEndpoint(mpb.GetBulkEndpointRequest(), timeout=5).port
    assert node_door_opens(node, kept) and bulk_opens(node_bulk, kept) and bulk_opens(proxy_port, kept)

    balancer.registry.RevokeKey(rpb.RevokeKeyRequest(key=taker.key.id), timeout=10)
    eventually(lambda: not node_door_opens(node, kept), 3, "the node's port refusing the kept token")
    assert not bulk_opens(node_bulk, kept) and not bulk_opens(proxy_port, kept)

    # The node itself holds the new token and stays in rotation.
    assert node.node_id in online(balancer)
    with sync_channel(balancer.address, balancer.node_key) as channel:
        fresh = rgrpc.RegistryStub(channel).GetFleetToken(rpb.GetFleetTokenRequest(), timeout=10).token
    assert fresh != kept and node_door_opens(node, fresh) and bulk_opens(proxy_port, fresh)


def test_fleet_tokens_expire_while_nodes_keep_working_across_rotations(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub, node_factory: NodeFactory
) -> None:
    ttl_s = 1.0  # a token works at most two windows and a quarter
    balancer = balancer_factory(hub, LLMLB_FLEET_TOKEN_TTL=str(ttl_s))
    node = node_factory(balancer, hub)
    wait_online(balancer, node, within=15)
    with sync_channel(balancer.address, balancer.node_key) as channel:
        kept = rgrpc.RegistryStub(channel).GetFleetToken(rpb.GetFleetTokenRequest(), timeout=10).token
    assert node_door_opens(node, kept)
    eventually(lambda: not node_door_opens(node, kept), 5, "the kept token expired")
    # What the balancer presents on routed calls now, windows later, the node holds: it renewed
    # its tokens over its session and never left rotation.
    for _ in range(3):
        assert node_door_opens(node, fleet_token_now(balancer, ttl_s))
        window = int(time.time() // ttl_s)
        eventually(lambda: int(time.time() // ttl_s) > window, 2 * ttl_s, "the next window")  # noqa: B023
    assert node.node_id in online(balancer)
    assert '"node.disconnected"' not in balancer.log()
