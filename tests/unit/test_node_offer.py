"""What a node offers the balancer: its memory budget (not the host's RAM), its labels, what each loaded
model takes and which are pinned; and the scheduler's commands (a pinned prefetch, an unload) reaching it.

The balancer side is a real gRPC Registry server in this process that records the registration and
each session's messages and sends commands, so the tests see what a balancer sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest

from common.config import load_node_config
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.types import Backend, GpuDevice, ModelOnNode, ModelState
from node.hardware import Hardware, offered
from node.link import BalancerLink
from node.model_book import ModelBook
from tests.fixtures.eventually import eventually_async

HOST = Hardware(backend=Backend.CPU, backends=(Backend.CPU,), cpu_count=2, memory_total_mb=24105)
GPU = Hardware(
    backend=Backend.CUDA,
    backends=(Backend.CUDA, Backend.CPU),
    gpus=(GpuDevice(0, "L4", 23034, 22000), GpuDevice(1, "L4", 23034, 500)),
    memory_total_mb=64000,
)


class Registry(rgrpc.RegistryServicer):
    """Records registrations and session messages; ``send`` queues a command on the open session."""

    def __init__(self) -> None:
        self.registrations: list[rpb.RegisterNodeRequest] = []
        self.received: list[rpb.NodeMessage] = []
        self.commands: asyncio.Queue[rpb.NodeCommand] = asyncio.Queue()

    async def RegisterNode(self, request: rpb.RegisterNodeRequest, context: Any) -> rpb.RegisterNodeResponse:
        self.registrations.append(request)
        return rpb.RegisterNodeResponse(node_id="node-m", heartbeat_interval_ms=50)

    async def NodeSession(self, request_iterator: Any, context: Any) -> AsyncIterator[rpb.BalancerMessage]:
        async def read() -> None:
            async for msg in request_iterator:
                self.received.append(msg)

        reader = asyncio.create_task(read())
        yield rpb.BalancerMessage(accepted=rpb.SessionAccepted(node_id="node-m", heartbeat_interval_ms=50))
        try:
            while True:
                yield rpb.BalancerMessage(command=await self.commands.get())
        finally:
            reader.cancel()

    def heartbeats(self) -> list[rpb.Heartbeat]:
        return [m.heartbeat for m in self.received if m.WhichOneof("body") == "heartbeat"]

    def acks(self) -> dict[int, rpb.CommandAck]:
        return {m.ack.command_id: m.ack for m in self.received if m.WhichOneof("body") == "ack"}


class Handler:
    """The node's side of the commands: a pool of two models, as the real one keeps it."""

    def __init__(self) -> None:
        self.memory: dict[str, int] = {"on-demand": 300}
        self.pins: set[str] = set()

    async def delete_model(self, model_id: str) -> None: ...

    async def prefetch(self, model_id: str, *, pin: bool = False) -> None:
        self.memory[model_id] = 700
        if pin:
            self.pins.add(model_id)

    async def unload(self, model_id: str) -> None:
        self.memory.pop(model_id, None)
        self.pins.discard(model_id)

    async def drain(self) -> None: ...

    async def undrain(self) -> None: ...


@pytest.fixture
async def balancer() -> AsyncIterator[tuple[Registry, int]]:
    registry = Registry()  # type: ignore[abstract]  # only the calls a node makes
    server = grpc.aio.server()
    rgrpc.add_RegistryServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield registry, port
    finally:
        await server.stop(grace=None)


def test_a_capped_node_offers_its_cap_not_the_hardware() -> None:
    assert offered(HOST, 0, 300, host_free_mb=20000) == offered(HOST, 0, 300, 20000)
    assert offered(HOST, 0, 300, 20000).memory_total_mb == 24105  # uncapped: the host's RAM
    capped = offered(HOST, 100, 0, 20000)
    assert (capped.memory_total_mb, capped.memory_free_mb) == (100, 100)
    assert offered(HOST, 1000, 300, 20000).memory_free_mb == 700  # the cap less what is loaded
    assert offered(HOST, 1000, 1300, 20000).memory_free_mb == 0
    assert offered(HOST, 1000, 300, 50).memory_free_mb == 50  # never more than the host has free
    gpus = offered(GPU, 4000, 1000).gpus
    assert [(g.memory_total_mb, g.memory_free_mb) for g in gpus] == [(4000, 3000), (4000, 500)]


def test_the_budget_and_labels_come_from_flags_or_the_environment(tmp_path: Path) -> None:
    env = {"XLLM_MEMORY_BUDGET_MB": "2048", "XLLM_LABELS": "zone=a, gpu=l4"}
    config = load_node_config(home=tmp_path, env=env)
    assert config.memory_budget_mb == 2048
    assert config.labels == (("gpu", "l4"), ("zone", "a"))
    flags = load_node_config(home=tmp_path, env=env, memory_budget_mb=100, labels=["zone=b", "tier=x"])
    assert flags.memory_budget_mb == 100 and flags.labels == (("tier", "x"), ("zone", "b"))
    assert load_node_config(home=tmp_path, env={}).labels == ()
    with pytest.raises(ValueError, match="not key=value"):
        load_node_config(home=tmp_path, env={}, labels=["zone"])
    with pytest.raises(ValueError, match="XLLM_MEMORY_BUDGET_MB"):
        load_node_config(home=tmp_path, env={"XLLM_MEMORY_BUDGET_MB": "-5"})


async def test_registration_and_heartbeats_offer_the_budget_and_commands_pin_and_unload(
    tmp_path: Path, balancer: tuple[Registry, int]
) -> None:
    registry, port = balancer
    config = load_node_config(
        home=tmp_path, env={}, balancer=f"127.0.0.1:{port}", memory_budget_mb=1000, labels=["zone=a"]
    )
    handler = Handler()
    link = BalancerLink(
        config,
        HOST,
        "127.0.0.1:1",
        ModelBook(),
        handler,
        budget_mb=config.memory_budget_mb,
        model_memory=lambda: handler.memory,
        pinned=lambda: frozenset(handler.pins),
        runtime_states=lambda: {m: ModelOnNode("", m, ModelState.READY) for m in handler.memory},
    )
    link.start()
    try:
        await asyncio.wait_for(link.connected.wait(), 10)
        hello = registry.registrations[0]
        assert (hello.memory_total_mb, hello.memory_budget_mb) == (1000, 1000)
        assert dict(hello.labels) == {"zone": "a"}
        await eventually_async(lambda: bool(registry.heartbeats()))
        load = registry.heartbeats()[-1].load
        assert (load.memory_total_mb, load.memory_used_mb) == (1000, 300)

        registry.commands.put_nowait(
            rpb.NodeCommand(command_id=1, prefetch=rpb.PrefetchCommand(model_id="g", pin=True))
        )
        await eventually_async(lambda: 1 in registry.acks())
        assert registry.acks()[1].ok and handler.pins == {"g"}

        def reported() -> dict[str, tuple[int, bool]]:
            beat = registry.heartbeats()[-1]
            return {m.model_id: (m.memory_mb, m.pinned) for m in beat.models}

        await eventually_async(lambda: reported() == {"on-demand": (300, False), "g": (700, True)})
        assert registry.heartbeats()[-1].load.memory_used_mb == 1000  # the cap less both models

        registry.commands.put_nowait(rpb.NodeCommand(command_id=2, unload=rpb.UnloadCommand(model_id="g")))
        await eventually_async(lambda: 2 in registry.acks())
        assert registry.acks()[2].ok and handler.pins == set() and "g" not in handler.memory
        await eventually_async(lambda: registry.heartbeats()[-1].load.memory_used_mb == 300)
    finally:
        await link.stop()
