"""A swarm of simulated nodes for benchmarks: many node sessions in one process, no Inference server.

Each node speaks the node's side of the real protocol as ``devkit.echo_node`` does (``RegisterNode``,
then a ``NodeSession`` stream: hello, a heartbeat every interval the balancer hands out at
registration, reporting its models ready, acks for commands, a delete obeyed by dropping the model
from later heartbeats), but it is only a session: its address is one nothing listens on, so it must
not be routed to. A session that ends is opened again (registering first) a second later, as a
node's link does. What it costs is a few protobuf messages a second, so one process holds hundreds.

```python
swarm = NodeSwarm("127.0.0.1:50051", key, [f"sim-{i}" for i in range(500)], models=["m1", "m2"])
failures = await swarm.open()     # why any node could not register or open its session
...                               # swarm.stats: beats sent, how late; node.deleted: when deletes came
await swarm.close()
```
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from common import converters
from common.channels import bearer_metadata
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import CHANNEL_OPTIONS
from common.types import Backend, Capability, ModelOnNode, ModelState

REATTACH_S = 1.0  # pause before a session that ended is opened again
UNUSED_PORT_BASE = 20000  # node i claims 127.0.0.1:(this + i); nothing is meant to listen there
# What a write on a session that already ended raises, besides the RPC's own error.
_BROKEN = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # what read() answers at the stream's end; not in the stubs


@dataclass(slots=True)
class SwarmNode:
    """One simulated node: its session stream and what it reports."""

    node_id: str
    stub: Any = None  # the Registry stub of the connection it uses
    port: int = 0  # of its address, on which nothing listens
    call: Any = None  # the current session
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one write at a time on the stream
    models: list[str] = field(default_factory=list)
    heartbeat: rpb.NodeMessage = field(default_factory=rpb.NodeMessage)
    heartbeat_s: float = 1.0  # as the balancer answered at registration
    deleted: dict[str, float] = field(default_factory=dict)  # model -> time.monotonic() its delete arrived

    def build_heartbeat(self) -> None:
        # Built once per change: the swarm must stay cheap next to what it measures.
        self.heartbeat = rpb.NodeMessage(
            heartbeat=rpb.Heartbeat(
                load=pb.NodeLoad(active_requests=0, memory_total_mb=1024),
                models=[
                    converters.model_on_node_to_pb(ModelOnNode(self.node_id, m, ModelState.READY))
                    for m in self.models
                ],
            )
        )

    async def send(self, message: rpb.NodeMessage) -> None:
        async with self.lock:
            await self.call.write(message)


@dataclass(slots=True)
class SwarmStats:
    """How well the swarm kept its schedule, and the sessions that ended under it."""

    beats: int = 0
    missed: int = 0  # beats skipped because the simulator fell a whole interval behind
    worst_late_s: float = 0.0
    ended: list[str] = field(default_factory=list)  # why sessions ended early
    reattached: int = 0  # sessions opened again after one ended, as a node's link does


class NodeSwarm:
    """Many simulated nodes in one process, all attached to one balancer; ``await open()`` registers
    them and opens their sessions, ``await close()`` ends them all."""

    def __init__(
        self,
        address: str,
        key: str,
        node_ids: Sequence[str],
        *,
        models: Sequence[str],
        capabilities: Sequence[Capability] = (Capability.CHAT, Capability.COMPLETION),
        connections: int = 8,
        register_in_flight: int = 32,
    ) -> None:
        self._connections = connections
        self._register_in_flight = register_in_flight
        self._capabilities = tuple(capabilities)
        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]  # one connection each
        self._channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(connections)]
        self._stubs = [rgrpc.RegistryStub(c) for c in self._channels]
        self._auth = bearer_metadata(key)
        self.nodes = [SwarmNode(node_id, models=list(models)) for node_id in node_ids]
        self.stats = SwarmStats()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.opened = 0  # nodes whose first session ``open()`` has opened so far

    async def open(self) -> list[str]:
        """Registers every node and opens its session; why any failed."""
        gate = asyncio.Semaphore(self._register_in_flight)
        failures: list[str] = []

        async def one(i: int, node: SwarmNode) -> None:
            node.stub, node.port = self._stubs[i % self._connections], UNUSED_PORT_BASE + i
            async with gate:
                try:
                    await self._open(node)
                except (grpc.aio.AioRpcError, RuntimeError, TimeoutError) as exc:
                    failures.append(f"{node.node_id}: {exc!r}"[:200])
                    return
                self.opened += 1

        await asyncio.gather(*(one(i, node) for i, node in enumerate(self.nodes)))
        return failures

    async def _open(self, node: SwarmNode) -> None:
        reply = await node.stub.RegisterNode(
            rpb.RegisterNodeRequest(
                node_id=node.node_id,
                address=f"127.0.0.1:{node.port}",  # nothing listens: no request is routed to these nodes
                backends=[converters.backend_to_pb(Backend.CPU)],
                runtimes=["swarm"],
                capabilities=converters.capabilities_to_pb(self._capabilities),
                version="swarm",
                memory_total_mb=1024,
            ),
            timeout=60,
            metadata=self._auth,
        )
        node.heartbeat_s = reply.heartbeat_interval_ms / 1000
        call = node.call = node.stub.NodeSession(metadata=self._auth)
        node.build_heartbeat()
        await node.send(rpb.NodeMessage(hello=rpb.NodeHello(node_id=node.node_id)))
        first = await asyncio.wait_for(call.read(), 60)
        if first is _EOF or first.WhichOneof("body") != "accepted":
            call.cancel()
            raise RuntimeError(f"session not accepted: {first}")
        self._tasks.append(asyncio.create_task(self._beat(node, call)))
        self._tasks.append(asyncio.create_task(self._read(node, call)))

    async def _beat(self, node: SwarmNode, call: Any) -> None:
        due = time.monotonic()
        while node.call is call:
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            late = time.monotonic() - due
            self.stats.worst_late_s = max(self.stats.worst_late_s, late)
            try:
                await node.send(node.heartbeat)
            except _BROKEN:
                return  # the read loop records why the session ended, and opens another
            self.stats.beats += 1
            due += node.heartbeat_s
            if time.monotonic() - due > node.heartbeat_s:
                self.stats.missed += 1
                due = time.monotonic()

    async def _read(self, node: SwarmNode, call: Any) -> None:
        try:
            while (message := await call.read()) is not _EOF:
                if message.WhichOneof("body") != "command":
                    continue
                command = message.command
                if command.WhichOneof("body") == "delete_model":
                    model_id = command.delete_model.model_id
                    node.deleted[model_id] = time.monotonic()
                    node.models = [m for m in node.models if m != model_id]
                    node.build_heartbeat()
                await node.send(rpb.NodeMessage(ack=rpb.CommandAck(command_id=command.command_id, ok=True)))
            self.stats.ended.append(f"{node.node_id}: the balancer closed the stream")
        except grpc.aio.AioRpcError as exc:
            self.stats.ended.append(f"{node.node_id}: {exc.code().name} {exc.details()}")
        except _BROKEN as exc:
            self.stats.ended.append(f"{node.node_id}: {exc!r}")
        await self._reattach(node)

    async def _reattach(self, node: SwarmNode) -> None:
        """Registers and opens the session again, a second after each failure, as a node's link does."""
        while not self._closing:
            await asyncio.sleep(REATTACH_S)
            try:
                await self._open(node)
            except (grpc.aio.AioRpcError, RuntimeError, TimeoutError):
                continue
            self.stats.reattached += 1
            return

    def reset(self) -> None:
        """Starts counting beats and lateness afresh (sessions that ended stay counted)."""
        self.stats = SwarmStats(ended=self.stats.ended, reattached=self.stats.reattached)

    async def close(self) -> None:
        """Ends every session and closes the connections."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for node in self.nodes:
            if node.call is not None:
                node.call.cancel()
        for channel in self._channels:
            await channel.close(None)
