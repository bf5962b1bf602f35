"""The balancer process: store, catalogue, origin and the gRPC server with health and reflection."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from typing import Any

import grpc.aio
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from balancer.catalog import load_catalog
from balancer.fleet import Fleet
from balancer.origin import Origin
from balancer.registry import Registry
from balancer.servicers.manifest import ManifestServicer
from balancer.servicers.registry import RegistryServicer
from balancer.sessions import NodeSessions
from balancer.store import Store
from common.config import BalancerConfig
from common.pb.llmlb.v1 import manifest_pb2, manifest_pb2_grpc, registry_pb2, registry_pb2_grpc
from common.rpc import SERVER_OPTIONS
from common.types import NodeState

log = structlog.get_logger(__name__)
SERVICE_NAMES = (
    registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
    manifest_pb2.DESCRIPTOR.services_by_name["Manifest"].full_name,
)


@dataclass(slots=True)
class Balancer:
    """A running balancer: what tests and the CLI hold to stop it."""

    config: BalancerConfig
    store: Store
    origin: Origin
    registry: Registry
    server: grpc.aio.Server
    health: Any  # grpc_health's asyncio servicer ships without type stubs
    port: int

    async def stop(self, grace: float = 5.0) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        await self.origin.close()
        await self.store.close()
        log.info("balancer.stopped")


async def start(config: BalancerConfig) -> Balancer:
    """Opens the store (migrating it), seeds the catalogue and starts serving gRPC."""
    catalog = load_catalog(
        config.catalog_path, config.hf_endpoint
    )  # a broken catalogue stops us before any I/O
    store = await Store.open(config.database_url)
    origin = Origin(config)
    registry = Registry(store, origin)
    await registry.seed(catalog)
    fleet = Fleet()
    sessions = NodeSessions(store, fleet)
    for node in await store.list_nodes():  # nobody is connected to a process that just started
        await store.set_node_state(node.id, NodeState.OFFLINE)

    server = grpc.aio.server(options=SERVER_OPTIONS)
    registry_pb2_grpc.add_RegistryServicer_to_server(
        RegistryServicer(registry, store, fleet, sessions, config), server
    )
    manifest_pb2_grpc.add_ManifestServicer_to_server(ManifestServicer(registry, origin), server)
    health_servicer: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(config.grpc_listen)
    if port == 0:
        await store.close()
        raise OSError(f"cannot listen on {config.grpc_listen}")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = config.grpc_listen.rpartition(":")[0]
    log.info("balancer.listening", grpc=f"{host}:{port}", database=config.database_url, models=len(catalog))
    return Balancer(config, store, origin, registry, server, health_servicer, port)


async def serve(config: BalancerConfig) -> None:
    """Runs the balancer until SIGINT or SIGTERM, then stops gracefully."""
    balancer = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("balancer.stopping")
    await balancer.stop()
