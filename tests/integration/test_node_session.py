"""The balancer side of a node's live link: registration, the session stream, durable deletes.

The node here is a bare gRPC client speaking the wire contract, so what is tested is the balancer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import httpx
import pytest

from common.errors import ErrorCode
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import error_from_rpc
from devkit.fake_hub import FakeHub
from tests.fixtures.eventually import eventually_async
from tests.integration.conftest import BalancerProcess, balancer_channel, pending_commands

GGUF = b"GGUF" + b"\x01" * 1024


class FakeNode:
    """A node's session from the outside: sends what it is told, collects what the balancer sends."""

    def __init__(self, address: str, node_id: str) -> None:
        self.node_id = node_id
        self.channel = balancer_channel(address)
        self.stub = rgrpc.RegistryStub(self.channel)
        self.outbox: asyncio.Queue[rpb.NodeMessage | None] = asyncio.Queue()
        self.inbox: asyncio.Queue[rpb.BalancerMessage] = asyncio.Queue()
        self.call: grpc.aio.StreamStreamCall[rpb.NodeMessage, rpb.BalancerMessage] | None = None
        self.reader: asyncio.Task[None] | None = None

    async def register(self) -> rpb.RegisterNodeResponse:
        return await self.stub.RegisterNode(
            rpb.RegisterNodeRequest(
                node_id=self.node_id,
                address="127.0.0.1:1",
                backends=[pb.BACKEND_CPU],
                runtimes=["llama.cpp"],
                version="test",
            )
        )

    async def _messages(self) -> AsyncIterator[rpb.NodeMessage]:
        yield rpb.NodeMessage(hello=rpb.NodeHello(node_id=self.node_id))
        while (msg := await self.outbox.get()) is not None:
            yield msg

    async def connect(self) -> rpb.SessionAccepted:
        self.call = self.stub.NodeSession(self._messages())
        self.reader = asyncio.create_task(self._read())
        getter = asyncio.ensure_future(self.inbox.get())
        await asyncio.wait({getter, self.reader}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            if self.reader.done():
                self.reader.result()  # the stream failed: raise its error
            raise TimeoutError("no answer to hello")
        first = getter.result()
        assert first.WhichOneof("body") == "accepted"
        return first.accepted

    async def _read(self) -> None:
        assert self.call is not None
        async for msg in self.call:
            await self.inbox.put(msg)

    async def next_command(self, within: float = 1.0) -> rpb.NodeCommand:
        deadline = time.monotonic() + within
        while (msg := await asyncio.wait_for(self.inbox.get(), deadline - time.monotonic())).WhichOneof(
            "body"
        ) == "fleet_token":  # renewed tokens come between commands
            pass
        assert msg.WhichOneof("body") == "command"
        return msg.command

    async def send(self, msg: rpb.NodeMessage) -> None:
        await self.outbox.put(msg)

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.reader is not None:
            self.reader.cancel()
        await self.channel.close(grace=None)


async def online(balancer: BalancerProcess) -> dict[str, int]:
    async with balancer_channel(balancer.address) as channel:
        nodes = (await rgrpc.RegistryStub(channel).ListNodes(rpb.ListNodesRequest())).nodes
    return {n.id: n.state for n in nodes}


async def test_delete_reaches_an_online_node_within_a_second(balancer: BalancerProcess, hub: FakeHub) -> None:
    hub.add_repo("acme/m", {"w.gguf": GGUF})
    balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/m"))
    node = FakeNode(balancer.address, "node-a")
    try:
        reply = await node.register()
        assert reply.node_id == "node-a" and reply.heartbeat_timeout_ms > 0
        await node.connect()
        assert (await online(balancer))["node-a"] == pb.NODE_STATE_ONLINE

        started = time.monotonic()
        async with balancer_channel(balancer.address) as channel:
            done = await rgrpc.RegistryStub(channel).DeleteModel(rpb.DeleteModelRequest(model_id="acme/m"))
        assert done.nodes_notified == 1
        command = await node.next_command(within=1.0)
        assert time.monotonic() - started < 1.0
        assert command.delete_model.model_id == "acme/m"
        await node.send(rpb.NodeMessage(ack=rpb.CommandAck(command_id=command.command_id, ok=True)))

        async def acknowledged() -> bool:
            return not await asyncio.to_thread(pending_commands, balancer, "node-a")

        await eventually_async(acknowledged, 5, "the balancer recording the ack")
    finally:
        await node.close()
    # Acknowledged: a new session brings no command back.
    again = FakeNode(balancer.address, "node-a")
    try:
        await again.connect()
        with pytest.raises(TimeoutError):
            await again.next_command(within=0.5)
    finally:
        await again.close()


async def test_offline_node_gets_the_delete_when_it_reconnects(
    balancer: BalancerProcess, hub: FakeHub
) -> None:
    hub.add_repo("acme/m", {"w.gguf": GGUF})
    balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/m"))
    node = FakeNode(balancer.address, "node-b")
    await node.register()  # known to the balancer, but no session open
    balancer.registry.DeleteModel(rpb.DeleteModelRequest(model_id="acme/m"))
    balancer.restart()  # the command is durable: it survives the balancer too
    try:
        await node.connect()
        command = await node.next_command(within=1.0)
        assert command.delete_model.model_id == "acme/m"
        # Not acknowledged (the node failed): it is sent again on the next session.
        await node.send(
            rpb.NodeMessage(ack=rpb.CommandAck(command_id=command.command_id, ok=False, error="busy"))
        )
    finally:
        await node.close()
    retry = FakeNode(balancer.address, "node-b")
    try:
        await retry.connect()
        assert (await retry.next_command(within=1.0)).command_id == command.command_id
    finally:
        await retry.close()


async def test_a_dropped_node_leaves_rotation_within_a_second(balancer: BalancerProcess) -> None:
    node = FakeNode(balancer.address, "node-c")
    await node.register()
    await node.connect()
    assert (await online(balancer))["node-c"] == pb.NODE_STATE_ONLINE
    await node.close()

    async def offline() -> bool:
        return (await online(balancer))["node-c"] == pb.NODE_STATE_OFFLINE

    closed = time.monotonic()
    await eventually_async(offline, 1.0, "node-c offline", every=0.02)
    assert time.monotonic() - closed < 1.0


async def test_a_silent_node_leaves_rotation_after_the_heartbeat_timeout(
    balancer_factory, hub: FakeHub
) -> None:
    proc = balancer_factory(hub, LLMLB_HEARTBEAT_TIMEOUT_MS="500")
    node = FakeNode(proc.address, "node-d")
    try:
        await node.register()
        await node.connect()
        await node.send(rpb.NodeMessage(heartbeat=rpb.Heartbeat()))  # one heartbeat, then silence

        async def offline() -> bool:
            return (await online(proc))["node-d"] == pb.NODE_STATE_OFFLINE

        await eventually_async(offline, 3.0, "node-d offline", every=0.02)
    finally:
        await node.close()


async def test_session_reports_model_state(balancer: BalancerProcess) -> None:
    node = FakeNode(balancer.address, "node-e")
    try:
        await node.register()
        await node.connect()
        status = pb.ModelNodeStatus(
            model_id="gemma-3-270m",
            state=pb.MODEL_STATE_DOWNLOADING,
            downloaded_bytes=253113024 // 4,
            total_bytes=253113024,
            node_id="someone-else",  # ignored: a node speaks only for itself
        )
        await node.send(rpb.NodeMessage(model_state=status))

        async def reported() -> bool:
            async with balancer_channel(balancer.address) as channel:
                st = await rgrpc.RegistryStub(channel).GetModelStatus(
                    rpb.GetModelStatusRequest(model_id="gemma-3-270m")
                )
            return st.status == pb.MODEL_STATE_DOWNLOADING and abs(st.progress - 0.25) < 0.01

        await eventually_async(reported, 2.0, "the download progress at the balancer", every=0.02)
        ready = pb.ModelNodeStatus(model_id="gemma-3-270m", state=pb.MODEL_STATE_READY, total_bytes=253113024)
        await node.send(rpb.NodeMessage(heartbeat=rpb.Heartbeat(models=[ready])))

        async def is_ready() -> bool:
            async with balancer_channel(balancer.address) as channel:
                model = await rgrpc.RegistryStub(channel).GetModel(
                    rpb.GetModelRequest(model_id="gemma-3-270m")
                )
            return model.ready and [n.node_id for n in model.nodes] == ["node-e"]

        await eventually_async(is_ready, 2.0, "the model ready on node-e", every=0.02)
        load = pb.NodeLoad(active_requests=3, queued_requests=1, memory_total_mb=24000)
        await node.send(rpb.NodeMessage(heartbeat=rpb.Heartbeat(models=[ready], load=load)))

        async def load_listed() -> bool:
            async with balancer_channel(balancer.address) as channel:
                nodes = (await rgrpc.RegistryStub(channel).ListNodes(rpb.ListNodesRequest())).nodes
            me = next(n for n in nodes if n.id == "node-e")
            return me.load.active_requests == 3 and [m.model_id for m in me.models] == ["gemma-3-270m"]

        await eventually_async(load_listed, 2.0, "node-e's load listed", every=0.02)
    finally:
        await node.close()


async def test_a_node_offline_or_draining_is_not_ready_for_a_model_in_either_door(
    balancer: BalancerProcess,
) -> None:
    """A model loaded on a node shows ``ready`` there only while the node takes requests."""
    loaded = pb.ModelNodeStatus(model_id="gemma-3-270m", state=pb.MODEL_STATE_READY, total_bytes=1)
    leaving, draining = (
        FakeNode(balancer.address, "node-leaving"),
        FakeNode(balancer.address, "node-draining"),
    )
    headers = {"authorization": f"Bearer {balancer.admin_key}"} if balancer.admin_key else {}

    async def grpc_nodes() -> dict[str, bool]:
        async with balancer_channel(balancer.address) as channel:
            model = await rgrpc.RegistryStub(channel).GetModel(rpb.GetModelRequest(model_id="gemma-3-270m"))
        return {n.node_id: n.ready for n in model.nodes}

    async def listings() -> tuple[dict[str, bool], dict[str, bool], dict[str, bool]]:
        """Per-node ``ready`` as gRPC, ``/v1/models`` and ``/v0/models`` show it."""
        async with httpx.AsyncClient(base_url=balancer.http_url, headers=headers, timeout=5) as http:
            v1 = (await http.get("/v1/models/gemma-3-270m")).json()
            v0 = next(m for m in (await http.get("/v0/models")).json()["data"] if m["id"] == "gemma-3-270m")
        return (
            await grpc_nodes(),
            {n["node_id"]: n["ready"] for n in v1["nodes"]},
            {n["node_id"]: n["ready"] for n in v0["nodes"]},
        )

    try:
        for node in (leaving, draining):
            await node.register()
            await node.connect()
            await node.send(rpb.NodeMessage(heartbeat=rpb.Heartbeat(models=[loaded])))
        both = {"node-leaving": True, "node-draining": True}

        async def both_ready() -> bool:
            return await listings() == (both, both, both)

        await eventually_async(both_ready, 2.0, "the model ready on both nodes", every=0.02)

        async with balancer_channel(balancer.address) as channel:
            await rgrpc.RegistryStub(channel).DrainNode(rpb.DrainNodeRequest(node_id="node-draining"))
        await leaving.close()

        async def offline() -> bool:
            return (await online(balancer))["node-leaving"] == pb.NODE_STATE_OFFLINE

        await eventually_async(offline, 2.0, "node-leaving offline", every=0.02)
        neither = {"node-leaving": False, "node-draining": False}
        assert await listings() == (neither, neither, neither)
        async with balancer_channel(balancer.address) as channel:
            model = await rgrpc.RegistryStub(channel).GetModel(rpb.GetModelRequest(model_id="gemma-3-270m"))
        assert not model.ready
        assert {n.node_id: n.state for n in model.nodes} == {
            "node-leaving": pb.MODEL_STATE_READY,  # still what each node last said it holds
            "node-draining": pb.MODEL_STATE_READY,
        }
    finally:
        await leaving.close()
        await draining.close()


async def test_a_node_registering_a_capability_this_balancer_does_not_know_is_refused(
    balancer: BalancerProcess,
) -> None:
    async with balancer_channel(balancer.address) as channel:
        stub = rgrpc.RegistryStub(channel)
        unnamed = pb.Capability.ValueType(99)
        for value, name in ((pb.CAPABILITY_UNSPECIFIED, "CAPABILITY_UNSPECIFIED"), (unnamed, "99")):
            request = rpb.RegisterNodeRequest(
                node_id="node-odd", address="127.0.0.1:1", capabilities=[pb.CAPABILITY_CHAT, value]
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RegisterNode(request)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_from_rpc(refused.value).code is ErrorCode.INVALID_REQUEST
            assert f"got ['{name}']" in (refused.value.details() or "")
        listed = (await stub.ListNodes(rpb.ListNodesRequest())).nodes
        assert "node-odd" not in [n.id for n in listed]


async def test_session_needs_hello_from_a_registered_node(balancer: BalancerProcess) -> None:
    stranger = FakeNode(balancer.address, "never-registered")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stranger.connect()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await stranger.close()
    async with balancer_channel(balancer.address) as channel:
        stub = rgrpc.RegistryStub(channel)
        for bad_request in (
            rpb.RegisterNodeRequest(node_id="x"),  # no address
            rpb.RegisterNodeRequest(node_id="../etc", address="127.0.0.1:1"),
            rpb.RegisterNodeRequest(node_id="n" * 129, address="127.0.0.1:1"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.RegisterNode(bad_request)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assigned = await stub.RegisterNode(rpb.RegisterNodeRequest(address="127.0.0.1:1"))
        assert assigned.node_id.startswith("node-")
        nodes = (await stub.ListNodes(rpb.ListNodesRequest())).nodes
        assert assigned.node_id in [n.id for n in nodes]
