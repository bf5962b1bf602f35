"""The node link's prefix reports, read by a real gRPC Registry server in this process that records them.

The server speaks the real protocol (RegisterNode, then a NodeSession stream answered with
``accepted``) and keeps every NodeMessage each session sends, so the tests see what a balancer sees.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest

from common.config import NodeConfig
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.types import Backend
from node.hardware import Hardware
from node.link import BalancerLink
from node.model_book import ModelBook
from tests.fixtures.eventually import eventually_async

CPU = Hardware(backend=Backend.CPU, backends=(Backend.CPU,), cpu_count=2, memory_total_mb=4096)


class RecordingRegistry(rgrpc.RegistryServicer):
    """Registers every node and records each session's messages; ``end_session`` closes the current one."""

    def __init__(self) -> None:
        self.sessions: list[list[rpb.NodeMessage]] = []
        self._end = asyncio.Event()

    async def RegisterNode(self, request: rpb.RegisterNodeRequest, context: Any) -> rpb.RegisterNodeResponse:
        return rpb.RegisterNodeResponse(node_id="node-p", heartbeat_interval_ms=5000)

    async def NodeSession(self, request_iterator: Any, context: Any) -> AsyncIterator[rpb.BalancerMessage]:
        received: list[rpb.NodeMessage] = []
        self.sessions.append(received)
        self._end.clear()

        async def read() -> None:
            async for msg in request_iterator:
                received.append(msg)

        reader = asyncio.create_task(read())
        yield rpb.BalancerMessage(accepted=rpb.SessionAccepted(node_id="node-p", heartbeat_interval_ms=5000))
        await self._end.wait()
        reader.cancel()

    def end_session(self) -> None:
        self._end.set()

    def reports(self, session: int = -1) -> list[tuple[str, list[int]]]:
        if len(self.sessions) <= session or not self.sessions:
            return []
        return [
            (m.prefixes.model_id, list(m.prefixes.hashes))
            for m in self.sessions[session]
            if m.WhichOneof("body") == "prefixes"
        ]


class NoCommands:
    async def delete_model(self, model_id: str) -> None: ...

    async def prefetch(self, model_id: str, *, pin: bool = False) -> None: ...

    async def unload(self, model_id: str) -> None: ...

    async def drain(self) -> None: ...

    async def undrain(self) -> None: ...


@pytest.fixture
async def wired(tmp_path: Path) -> AsyncIterator[tuple[RecordingRegistry, BalancerLink]]:
    registry = RecordingRegistry()  # type: ignore[abstract]  # only the calls a node makes
    server = grpc.aio.server()
    rgrpc.add_RegistryServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = NodeConfig(home=tmp_path, models_dir=tmp_path / "models", balancer=f"127.0.0.1:{port}")
    link = BalancerLink(config, CPU, "127.0.0.1:1", ModelBook(), NoCommands())
    try:
        yield registry, link
    finally:
        await link.stop()
        await server.stop(grace=None)


async def test_a_change_from_a_worker_thread_reaches_the_session_and_an_empty_set_takes_it_back(
    wired: tuple[RecordingRegistry, BalancerLink],
) -> None:
    registry, link = wired
    link.start()
    await asyncio.wait_for(link.connected.wait(), 10)
    thread = threading.Thread(target=link.prefixes_changed, args=("gemma-3-270m", [7, 8, 9]))
    thread.start()
    thread.join()
    await eventually_async(lambda: registry.reports() == [("gemma-3-270m", [7, 8, 9])])
    link.prefixes_changed("gemma-3-270m", [])  # the model unloaded
    await eventually_async(lambda: registry.reports()[-1:] == [("gemma-3-270m", [])])


async def test_a_burst_of_changes_is_coalesced_and_ends_on_the_latest_set(
    wired: tuple[RecordingRegistry, BalancerLink],
) -> None:
    registry, link = wired
    link.start()
    await asyncio.wait_for(link.connected.wait(), 10)
    for i in range(1, 101):
        link.prefixes_changed("m", list(range(i)))
    await eventually_async(lambda: registry.reports()[-1:] == [("m", list(range(100)))])
    assert len(registry.reports()) < 10


async def test_every_new_session_starts_with_the_report_of_each_model_keeping_prefixes(
    wired: tuple[RecordingRegistry, BalancerLink],
) -> None:
    registry, link = wired
    link.prefixes_changed("a", [1, 2])  # before any session: kept for the first one
    link.prefixes_changed("b", [3])
    link.prefixes_changed("c", [4])
    link.prefixes_changed("c", [])  # c keeps nothing any more: not reported
    link.start()
    await eventually_async(lambda: sorted(registry.reports(0)) == [("a", [1, 2]), ("b", [3])])
    kinds = [m.WhichOneof("body") for m in registry.sessions[0]]
    assert kinds[:2] == ["hello", "heartbeat"]  # the reports follow hello and the first heartbeat

    link.prefixes_changed("a", [5])
    await eventually_async(lambda: registry.reports(0)[-1:] == [("a", [5])])
    registry.end_session()
    await eventually_async(lambda: len(registry.sessions) == 2 and len(registry.reports(1)) == 2, within=15)
    assert sorted(registry.reports(1)) == [("a", [5]), ("b", [3])]
