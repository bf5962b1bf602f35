"""The node process (``xllm serve``): storage, resolver, downloads, the gRPC server and the balancer link."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc.aio
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.config import NodeConfig, merged_env
from common.errors import LlmlbError
from common.hub import HubFiles
from common.pb.llmlb.v1 import inference_pb2, inference_pb2_grpc, manifest_pb2, manifest_pb2_grpc
from common.rpc import SERVER_OPTIONS
from common.types import Backend
from node import hardware
from node.downloader import Downloader, OriginSource
from node.hardware import Hardware
from node.link import BalancerLink, Load
from node.model_states import ModelState, ModelStates
from node.pool import ModelPool, PoolSettings
from node.resolver import Resolver
from node.servicers.inference import InferenceServicer
from node.servicers.manifest import NodeManifestServicer
from node.storage import Storage

log = structlog.get_logger(__name__)
SERVICE_NAMES = (
    manifest_pb2.DESCRIPTOR.services_by_name["Manifest"].full_name,
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
)
# Hashing and file I/O run here, never on the event loop.
IO_THREADS = 4


@dataclass(slots=True)
class NodeCommands:
    """What the node does on the balancer's commands (the link acknowledges when each returns)."""

    storage: Storage
    downloader: Downloader
    resolver: Resolver
    states: ModelStates
    pool: ModelPool
    draining: bool = False

    async def delete_model(self, model_id: str) -> None:
        """Unloads the model, stops its downloads and deletes the local copy (never the shared dir)."""
        await self.pool.unload(model_id)
        await self.downloader.cancel_model(model_id)
        freed = await self.storage.delete(model_id)
        self.states.remove(model_id)
        log.info("model.deleted", model_id=model_id, bytes=freed)

    async def prefetch(self, model_id: str) -> None:
        """Fetches the model's files and loads it, so its first request finds it warm."""
        await self.pool.prefetch(await self.resolver.resolve(model_id))

    async def drain(self) -> None:
        self.draining = True
        log.info("node.draining")


@dataclass(slots=True)
class NodeProcess:
    """A running node: what tests and the CLI hold to stop it."""

    config: NodeConfig
    parts: NodeParts
    server: grpc.aio.Server
    health: Any  # grpc_health's asyncio servicer ships without type stubs
    port: int
    address: str
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def resolver(self) -> Resolver:
        return self.parts.resolver

    @property
    def storage(self) -> Storage:
        return self.parts.storage

    async def stop(self, grace: float = 5.0) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.parts.link.stop()  # the balancer takes the node out of rotation first
        await self.server.stop(grace)
        await self.parts.close()
        log.info("node.stopped", node_id=self.parts.link.node_id)

    def spawn(self, coro: Awaitable[Any], what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except LlmlbError as exc:
                log.warning("node.background_failed", what=what, error=exc.message)

        task = asyncio.create_task(run())
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def advertised_address(config: NodeConfig, port: int) -> str:
    """``--advertise``, else the listen host with the bound port (the host name for a wildcard)."""
    if config.advertise:
        return config.advertise
    host = config.grpc_listen.rpartition(":")[0]
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = socket.getfqdn()
    return f"{host}:{port}"


@dataclass(slots=True)
class NodeParts:
    """The node's working parts, without a server: ``xllm pull`` uses them on their own."""

    hardware: Hardware
    pool: ThreadPoolExecutor
    storage: Storage
    states: ModelStates
    hub: HubFiles
    downloader: Downloader
    link: BalancerLink
    resolver: Resolver
    models: ModelPool
    commands: NodeCommands

    async def close(self) -> None:
        await self.link.stop()
        await self.models.close()
        await self.hub.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def assemble(config: NodeConfig, address: str) -> NodeParts:
    forced = None if config.backend == "auto" else Backend(config.backend)
    found = hardware.detect(forced)
    pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="xllm-io")
    storage = Storage(config.models_dir, pool)
    storage.root.mkdir(parents=True, exist_ok=True)
    states = ModelStates()
    hub = HubFiles(token=config.hf_token, timeout_s=config.download_stall_timeout_s, library="llmlb-node")
    downloader = Downloader(storage, config)
    models = ModelPool(found, PoolSettings.from_env(merged_env(config.home)))

    def load() -> Load:
        details = models.details()
        return Load(sum(d.active for d in details), sum(d.waiting for d in details))

    def runtime_states() -> dict[str, ModelState]:
        errors = models.errors()
        return {
            model_id: ModelState(model_id, state, error=errors.get(model_id, ""))
            for model_id, state in models.states().items()
        }

    link = BalancerLink(
        config,
        found,
        address,
        states,
        runtimes=models.engines,
        capabilities=models.registry.capabilities,
        load=load,
        runtime_states=runtime_states,
    )
    resolver = Resolver(config, found.backend, storage, downloader, states, link, OriginSource(config, hub))
    downloader.on_progress = resolver.on_progress
    commands = NodeCommands(storage, downloader, resolver, states, models)
    link.handler = commands  # the commands need the resolver, which needs the link: bound last
    return NodeParts(found, pool, storage, states, hub, downloader, link, resolver, models, commands)


async def start(config: NodeConfig) -> NodeProcess:
    """Opens the models dir, starts serving gRPC, connects to the balancer, resumes broken downloads."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    port = server.add_insecure_port(config.grpc_listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.grpc_listen}")
    parts = assemble(config, advertised_address(config, port))
    storage, resolver, link = parts.storage, parts.resolver, parts.link

    manifest_pb2_grpc.add_ManifestServicer_to_server(NodeManifestServicer(resolver, storage), server)
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceServicer(parts.models, resolver.resolve, lambda: link.node_id), server
    )
    health_servicer: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    node = NodeProcess(config, parts, server, health_servicer, port, advertised_address(config, port))
    await resolver.survey()  # the balancer hears at once what this node already holds
    link.start()
    for model_id in storage.unfinished():  # a node killed mid-download resumes on its next start
        node.spawn(resolver.resolve(model_id), f"resume {model_id}")
    log.info(
        "node.listening",
        grpc=node.address,
        models_dir=str(storage.root),
        shared_dir=str(config.shared_dir) if config.shared_dir else None,
        backend=parts.hardware.backend.value,
        balancer=config.balancer,
    )
    return node


async def serve(config: NodeConfig) -> None:
    """Runs the node until SIGINT or SIGTERM, then stops gracefully."""
    node = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("node.stopping")
    await node.stop()
