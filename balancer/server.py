"""The balancer process: store, catalogue, origin and the gRPC server with health and reflection."""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass
from typing import Any

import grpc.aio
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from balancer.auth import AuthInterceptor, KeyRing
from balancer.bulk_proxy import BulkProxy
from balancer.catalog import Catalog, load_catalog
from balancer.edge.labels import Labels
from balancer.fleet.clients import NodeClients
from balancer.fleet.owners import Revocations
from balancer.fleet.sessions import NodeSessions
from balancer.fleet.token import FleetTokens
from balancer.fleet.view import Fleet
from balancer.http.app import create_app
from balancer.http.serving import start_http
from balancer.origin import Origin
from balancer.parts import BalancerParts
from balancer.replicas import Replicas
from balancer.router import Router
from balancer.scheduler.loop import SchedulerLoop
from balancer.servicers.inference import RoutedInferenceServicer
from balancer.servicers.manifest import ManifestServicer
from balancer.servicers.registry import RegistryServicer
from balancer.store import Store
from common import tracing
from common.asgi_serving import AsgiServer
from common.channels import server_credentials
from common.config import BalancerConfig
from common.metrics import BalancerMetrics
from common.pb.llmlb.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    manifest_pb2,
    manifest_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from common.rpc import server_options
from common.secret import masked_url
from common.types import ModelState

log = structlog.get_logger(__name__)
SERVICE_NAMES = (
    registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
    manifest_pb2.DESCRIPTOR.services_by_name["Manifest"].full_name,
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
)


@dataclass(slots=True)
class Balancer:
    """A running balancer: what tests and the CLI hold to stop it."""

    parts: BalancerParts
    server: grpc.aio.Server
    health: Any  # grpc_health's asyncio servicer ships without type stubs
    port: int
    http: AsgiServer | None
    clients: NodeClients
    bulk: BulkProxy | None = None

    @property
    def config(self) -> BalancerConfig:
        return self.parts.config

    @property
    def store(self) -> Store:
        return self.parts.store

    @property
    def catalog(self) -> Catalog:
        return self.parts.catalog

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def stop(self, grace: float = 5.0) -> None:
        """Stops taking calls on both doors at once, lets those in flight finish for up to ``grace``
        seconds, then hands the node sessions over and closes the store."""
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # Before the doors close: stopping the gRPC server ends the node sessions, to be handed over.
        self.parts.replicas.begin_stop()
        if self.parts.scheduler is not None:  # first: it hands its lease over before the store closes
            await self.parts.scheduler.stop()
        doors = [self.server.stop(grace), *([self.http.stop(grace)] if self.http is not None else [])]
        await asyncio.gather(*doors)
        if self.bulk is not None:
            await self.bulk.stop()
        await self.parts.sessions.close_all()
        await self.parts.replicas.stop()
        await self.parts.limits.stop()
        await self.parts.usage.stop()  # after the doors: every request counted is written
        await self.clients.close()
        await self.parts.origin.close()
        await self.parts.keys.settle()
        await self.parts.store.close()
        log.info("balancer.stopped")


def _fleet_gauges(
    fleet: Fleet, router: Router, labels: Labels
) -> dict[str, tuple[str, dict[tuple[str, ...], float]]]:
    """Scrape-time gauges: nodes by state, models downloading, requests queued, slots per loaded model.

    A model id a node reports that the catalogue lacks is counted under the empty label.
    """
    online = fleet.online()
    draining = fleet.draining()
    downloads: dict[tuple[str, ...], float] = {}
    slots: dict[tuple[str, ...], float] = {}
    for node_id in online:
        for status in fleet.node_models(node_id):
            if status.state is ModelState.DOWNLOADING:
                label = (labels.model(status.model_id),)
                downloads[label] = downloads.get(label, 0.0) + 1
            elif status.state is ModelState.READY and status.slots:
                pair = (labels.node(node_id), labels.model(status.model_id))
                slots[pair] = slots.get(pair, 0.0) + status.slots
    return {
        "llmlb_nodes": (
            "Nodes connected to this balancer, by state.",
            {("online",): float(len(online)), ("draining",): float(len(draining))},
        ),
        "llmlb_model_downloads": ("Nodes downloading each model now.", downloads),
        "llmlb_queue_depth": ("Requests waiting for a free node.", {(): float(router.waiting)}),
        "llmlb_node_model_slots": (
            "Sequences each online node runs at once for each loaded model, as it reports them.",
            slots,
        ),
    }


async def bootstrap_admin_key(config: BalancerConfig, keys: KeyRing) -> None:
    """Stores ``LLMLB_ADMIN_KEY`` when set (and then writes no key file); else, on a store with no keys,
    makes the first admin key and says which file holds it (mode 0600)."""
    if config.admin_key is not None:
        await keys.seed_admin(config.admin_key)
        return
    secret = await keys.bootstrap(config.admin_key_file)
    if secret is not None:  # shown by where it is, never itself: stderr ends up in logs
        print(
            f"llmlb: created the first admin key in {config.admin_key_file} (mode 0600)",
            file=sys.stderr,
            flush=True,
        )


async def prepare_store(config: BalancerConfig) -> None:
    """What must happen once before several replicas start at once on one store: migrate it, make
    the first admin key and the fleet token's secret (``llmlb serve --workers``)."""
    store = await Store.open(config.database_url, pool_size=1)
    try:
        keys = KeyRing(store, enabled=config.auth)
        await bootstrap_admin_key(config, keys)
        await FleetTokens(store, config.fleet_token_ttl_s).load()
        await keys.settle()
    finally:
        await store.close()


async def start(config: BalancerConfig) -> Balancer:
    """Opens the store (migrating it), seeds the catalogue and starts serving gRPC."""
    seed = load_catalog(config.catalog_path, config.hf_endpoint)  # a broken file stops us before any I/O
    store = await Store.open(config.database_url, pool_size=config.database_pool_size)
    origin = Origin(config)
    fleet_tokens = FleetTokens(store, config.fleet_token_ttl_s)
    await fleet_tokens.load()
    fleet = Fleet(fleet_tokens.current)
    replicas = Replicas(store, database_url=config.database_url, timeout_s=config.replica_timeout_ms / 1000)
    # Each owner of state subscribes to what the other replicas change (``balancer.changes``).
    catalog = Catalog(store, origin, replicas.bus)
    catalog.on_gone(fleet.forget_model)  # a model deleted elsewhere is no longer routed to here
    await catalog.seed(seed)
    heartbeat_timeout_s = config.heartbeat_timeout_ms / 1000
    sessions = NodeSessions(store, fleet, replicas, heartbeat_timeout_s=heartbeat_timeout_s)

    keys = KeyRing(
        store,
        enabled=config.auth,
        bus=replicas.bus,
        unknown_cache=config.unknown_key_cache,
        unknown_ttl_s=config.unknown_key_ttl_s,
        lookups_per_s=config.unknown_key_rate,
    )
    await bootstrap_admin_key(config, keys)
    clients = NodeClients()
    # The gauges read the router at scrape time; the closure sees it once it is assigned below.
    metrics = BalancerMetrics(lambda: _fleet_gauges(fleet, router, parts.labels))
    router = Router(config, catalog, fleet, clients, metrics)
    parts = BalancerParts(
        config, store, origin, catalog, fleet, sessions, router, keys, metrics, replicas, fleet_tokens
    )
    revocations = Revocations(fleet_tokens, sessions, store, replicas.bus, timeout_s=heartbeat_timeout_s)
    keys.on_revoke = revocations.revoked
    await replicas.start()  # before serving: every other replica's nodes are routable at once
    # Ports are shared only among ``--workers`` replicas: two balancers started on one port by
    # mistake must fail, not split the traffic between them.
    options = [*server_options(config.max_body_mb), ("grpc.so_reuseport", 1 if config.shared_ports else 0)]
    server = grpc.aio.server(options=options, interceptors=[AuthInterceptor(keys)])
    registry_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(parts), server)
    bulk = None
    if config.bulk_listen:
        bulk = BulkProxy(catalog, origin, keys, fleet_tokens, config.http_limits)
        try:
            await bulk.start(config.bulk_listen, shared=config.shared_ports)
        except OSError as exc:
            await replicas.stop()
            await store.close()
            raise OSError(
                f"cannot listen on {config.bulk_listen} for bulk transfers: {exc}; set LLMLB_BULK_PORT "
                "(0: any free port), or LLMLB_BULK_LISTEN=off"
            ) from None
    manifest_pb2_grpc.add_ManifestServicer_to_server(
        ManifestServicer(catalog, origin, bulk.port if bulk is not None else 0), server
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(RoutedInferenceServicer(parts.plane), server)
    health_servicer: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            creds = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            port = server.add_secure_port(config.grpc_listen, creds)
        else:
            port = server.add_insecure_port(config.grpc_listen)
    except RuntimeError:  # grpc's word for a port it could not bind
        port = 0
    if port == 0:
        if bulk is not None:
            await bulk.stop()
        await replicas.stop()
        await store.close()
        raise OSError(
            f"cannot listen on {config.grpc_listen} (LLMLB_GRPC_LISTEN, --grpc-listen): the address is in "
            "use or not this host's"
        )
    # Before the port answers: a client that reaches it must find every service SERVING, not unknown.
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    parts.usage.start()
    parts.limits.start()
    parts.scheduler = SchedulerLoop(parts)
    parts.scheduler.start()
    http = None
    if config.http_listen:
        try:
            http = await start_http(
                create_app(parts),
                config.http_listen,
                shared=config.shared_ports,
                grace_s=config.stop_grace_s,
                limits=config.http_limits,
            )
        except OSError as exc:
            await parts.scheduler.stop()
            await server.stop(None)
            await parts.limits.stop()
            await parts.usage.stop()
            if bulk is not None:
                await bulk.stop()
            await replicas.stop()
            await store.close()
            reason = exc.strerror or str(exc)
            raise OSError(f"cannot listen on {config.http_listen} (LLMLB_HTTP_LISTEN): {reason}") from None
    host = config.grpc_listen.rpartition(":")[0]
    log.info(
        "balancer.listening",
        grpc=f"{host}:{port}",
        http=f"{config.http_listen.rpartition(':')[0]}:{http.port}" if http else "off",
        database=masked_url(config.database_url),
        models=len(seed),
        auth="on" if config.auth else "off",
    )
    return Balancer(parts, server, health_servicer, port, http, clients, bulk)


async def serve(config: BalancerConfig) -> None:
    """Runs the balancer until SIGINT or SIGTERM, then stops gracefully; exports traces when the
    ``OTEL_*`` variables ask for them (``common.tracing``)."""
    async with tracing.exporting(tracing.BALANCER_SERVICE, dict(config.otel)):
        await _serve(config)


async def _serve(config: BalancerConfig) -> None:
    balancer = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("balancer.stopping", grace_s=config.stop_grace_s)
    await balancer.stop(config.stop_grace_s)
