"""The node process (``xllm serve``): its parts, the gRPC server, the metrics door and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc.aio
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import tracing
from common.config import NodeConfig
from common.errors import ErrorCode, LlmlbError
from common.hub import HubFiles
from common.metrics import NodeMetrics
from common.pb.llmlb.v1 import inference_pb2, inference_pb2_grpc, manifest_pb2, manifest_pb2_grpc
from common.rpc import server_options
from common.types import Backend, ModelOnNode, ModelSource, ModelState
from node import hardware
from node.blob_sources import OriginSource
from node.bulk_server import BulkServer
from node.downloader import Downloader
from node.hardware import Hardware
from node.link import BalancerLink, Load
from node.local_models import LocalModels
from node.metrics_http import MetricsHttpServer
from node.model_book import ModelBook
from node.pool import ModelPool
from node.resolver import Resolver
from node.servicers.inference import NodeInferenceServicer
from node.servicers.manifest import NodeManifestServicer
from node.storage import Storage
from node.token_auth import NodeCredentials, server_interceptors

log = structlog.get_logger(__name__)
SERVICE_NAMES = (
    manifest_pb2.DESCRIPTOR.services_by_name["Manifest"].full_name,
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
)
# Hashing and file I/O run here, never on the event loop.
IO_THREADS = 4
# Every state ``xllm_models`` reports, zero included, so a dashboard's series never vanish.
MODEL_STATES = tuple(s for s in ModelState if s is not ModelState.ABSENT)
MIB = 1024 * 1024


@dataclass(slots=True)
class NodeCommands:
    """What the node does on the balancer's commands (the link acknowledges when each returns)."""

    storage: Storage
    downloader: Downloader
    resolver: Resolver
    states: ModelBook
    pool: ModelPool
    link: BalancerLink
    draining: bool = False
    stopping: bool = False  # set on SIGTERM: the drain then lasts until the process ends

    async def delete_model(self, model_id: str) -> None:
        """Unloads the model, stops its downloads and deletes the local copy (never the shared dir)."""
        self.resolver.forget(model_id)  # first: resolutions under way stop before writing more
        await self.pool.unload(model_id)
        await self.downloader.cancel_model(model_id)
        freed = await self.storage.delete(model_id)
        self.states.remove(model_id)
        log.info("model.deleted", model_id=model_id, bytes=freed)

    async def prefetch(self, model_id: str, *, pin: bool = False) -> None:
        """Fetches the model's files and loads it, so its first request finds it warm.

        A pull that fails leaves the model failed with the reason, so ``llmlb models pull --wait``
        hears why instead of waiting out its timeout. ``pin``: a copy the balancer's scheduler placed,
        kept loaded until it is unloaded (see ``ModelPool.prefetch``).
        """
        if pin:  # reported pinned from now on, downloading included: the scheduler counts the copy
            self.pool.pin(model_id)
        try:
            resolved = await self.resolver.resolve(model_id)
            if pin and model_id not in self.pool.pinned():
                return  # unloaded while its files were fetched: the files stay, nothing loads
            await self.pool.prefetch(resolved, pin=pin)
        except BaseException as exc:
            if pin:
                self.pool.pin(model_id, False)
            if not isinstance(exc, LlmlbError):
                raise
            unknown = exc.code in (ErrorCode.MODEL_NOT_FOUND, ErrorCode.INVALID_MODEL_ID)
            if not unknown and self.states.get(model_id).state is not ModelState.FAILED:
                self.states.set(model_id, ModelState.FAILED, error=exc.message)
            raise

    async def unload(self, model_id: str) -> None:
        """Unloads the model and ends its pin; its files stay, so loading it again is quick."""
        await self.pool.unload(model_id)
        self.link.beat_now()  # the balancer counts the copy gone at once, not at the next heartbeat
        log.info("model.unloaded", model_id=model_id)

    async def drain(self) -> None:
        """Takes no new requests from now on; the balancer hears at once and routes around the node."""
        if self.draining:
            return
        self.draining = True
        self.link.beat_now()
        log.info("node.draining", node_id=self.link.node_id)

    async def undrain(self) -> None:
        """Takes new requests again after a drain command; refused while the node is shutting down."""
        if self.stopping:
            raise LlmlbError(ErrorCode.NODE_STOPPING, "the node is shutting down; its drain cannot be undone")
        if not self.draining:
            return
        self.draining = False
        self.link.beat_now()
        log.info("node.undrained", node_id=self.link.node_id)


@dataclass(slots=True)
class NodeProcess:
    """A running node: what tests and the CLI hold to stop it."""

    config: NodeConfig
    parts: NodeParts
    server: grpc.aio.Server
    health: Any  # grpc_health's asyncio servicer ships without type stubs
    port: int
    address: str
    inference: NodeInferenceServicer
    metrics_server: MetricsHttpServer | None = None
    bulk_server: BulkServer | None = None
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def resolver(self) -> Resolver:
        return self.parts.resolver

    @property
    def storage(self) -> Storage:
        return self.parts.storage

    @property
    def metrics_address(self) -> str:
        """``host:port`` of ``/metrics`` as bound (the real port when asked for port 0); empty when off."""
        return self.metrics_server.address if self.metrics_server is not None else ""

    async def drain(self, timeout_s: float) -> bool:
        """Refuses new requests, tells the balancer, and waits up to ``timeout_s`` for those in flight.

        Returns whether every request in flight finished in time.
        """
        started = asyncio.get_running_loop().time()
        self.parts.commands.stopping = True  # before the drain: the balancer must never undo this one
        await self.parts.commands.drain()
        try:
            await asyncio.wait_for(self.inference.wait_idle(), timeout_s)
        except TimeoutError:
            log.warning("node.drain_timeout", in_flight=self.inference.in_flight, timeout_s=timeout_s)
            return False
        waited = asyncio.get_running_loop().time() - started
        log.info("node.drained", node_id=self.parts.link.node_id, seconds=round(waited, 2))
        return True

    async def stop(self, grace: float = 5.0) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.parts.link.stop()  # the balancer takes the node out of rotation first
        await self.server.stop(grace)
        if self.bulk_server is not None:
            await self.bulk_server.stop()
        await self.parts.close()
        if self.metrics_server is not None:  # last: a scrape during the stop still answers
            await self.metrics_server.stop()
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
    io_threads: ThreadPoolExecutor
    storage: Storage
    states: ModelBook
    hub: HubFiles
    downloader: Downloader
    link: BalancerLink
    resolver: Resolver
    models: ModelPool
    commands: NodeCommands
    metrics: NodeMetrics
    local: LocalModels

    async def close(self) -> None:
        await self.local.stop()
        await self.link.stop()
        await self.models.close()
        await self.hub.close()
        self.io_threads.shutdown(wait=False, cancel_futures=True)


def pool_load(models: ModelPool) -> Load:
    """Requests holding a slot and requests queued, over every loaded model."""
    details = models.details()
    kv = max(models.kv_cache_usage().values(), default=0.0)
    return Load(sum(d.active for d in details), sum(d.waiting for d in details), round(100 * kv, 1))


def runtime_states(models: ModelPool) -> dict[str, ModelOnNode]:
    """Loading, ready or failed, per model the pool knows: these win over the files' states."""
    errors = models.errors()
    return {
        model_id: ModelOnNode("", model_id, state, error=errors.get(model_id, ""))
        for model_id, state in models.states().items()
    }


def node_gauges(
    states: ModelBook, models: ModelPool
) -> dict[str, tuple[str, Mapping[tuple[str, ...], float]]]:
    """The scrape-time gauges of ``NodeMetrics``: models by state (as heartbeats report them), queue, load."""
    picture = {s.model_id: s.state for s in states.snapshot()}
    picture.update({m: s.state for m, s in runtime_states(models).items()})
    by_state: dict[tuple[str, ...], float] = {(state,): 0.0 for state in MODEL_STATES}
    for state in picture.values():
        if state is not ModelState.ABSENT:
            by_state[(state,)] = by_state.get((state,), 0.0) + 1
    load = pool_load(models)
    return {
        "xllm_models": ("Models on this node, by state.", by_state),
        "xllm_queue_depth": (
            "Requests waiting for a slot or for their model to load.",
            {(): float(load.queued_requests)},
        ),
        "xllm_active_requests": ("Requests running in a model's slot.", {(): float(load.active_requests)}),
        "xllm_prefix_cache_bytes": (
            "Bytes of computed prompt prefixes a loaded model keeps (XLLM_PREFIX_CACHE_MB), by model.",
            {(model,): float(n) for model, n in models.prefix_cache_bytes().items()},
        ),
        "xllm_memory_budget_bytes": (
            "The memory the node offers and loads models into (XLLM_MEMORY_BUDGET_MB).",
            {(): float(models.budget_mb * MIB)},
        ),
        "xllm_model_memory_bytes": (
            "Memory each loaded or loading model holds against the budget (the node's estimate), by model.",
            {(model,): float(mb * MIB) for model, mb in models.memory_by_model().items()},
        ),
    }


def assemble(config: NodeConfig, address: str, credentials: NodeCredentials | None = None) -> NodeParts:
    """Builds the node's parts (nothing is started): the server and ``xllm pull`` both use them.

    ``credentials`` are the ones the server's door checks, so the link's registration opens the door.
    """
    forced = None if config.backend == "auto" else Backend(config.backend)
    found = hardware.detect(forced)
    io_threads = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="xllm-io")
    storage = Storage(config.models_dir, io_threads)
    storage.root.mkdir(parents=True, exist_ok=True)
    states = ModelBook()
    hub = HubFiles(token=config.hf_token, timeout_s=config.download_stall_timeout_s, library="llmlb-node")
    models = ModelPool(found, config.pool)

    metrics = NodeMetrics(lambda: node_gauges(states, models))
    downloader = Downloader(storage, config, metrics=metrics)
    link = BalancerLink(
        config,
        found,
        address,
        states,
        runtimes=models.engines.names,
        capabilities=models.engines.capabilities,
        formats=models.engines.formats,
        load=lambda: pool_load(models),
        runtime_states=lambda: runtime_states(models),
        draining=lambda: commands.draining,
        stopping=lambda: commands.stopping,
        credentials=credentials,
        budget_mb=config.pool.memory_budget_mb,
        model_memory=models.memory_by_model,
        pinned=models.pinned,
        model_slots=models.slots_by_model,
    )

    async def pinned(model_id: str) -> bool:  # a catalogue id: its folder is that model's copy
        try:
            return (await link.get_model(model_id)).source is not ModelSource.LOCAL
        except LlmlbError:
            return False  # unknown to the balancer, or no balancer answering: a local model

    local = LocalModels(storage, config.shared_dir, config.local_scan_interval_s, pinned)
    resolver = Resolver(
        config, found.backend, storage, downloader, states, link, OriginSource(config, hub), local
    )
    local.subscribe(resolver.local_models_changed)
    local.subscribe(link.local_models_changed)
    downloader.on_progress = resolver.on_progress
    commands = NodeCommands(storage, downloader, resolver, states, models, link)
    link.handler = commands  # the commands need the resolver, which needs the link: bound last
    models.prefix_listener = link  # the balancer hears which prompt prefixes each model keeps
    return NodeParts(
        found, io_threads, storage, states, hub, downloader, link, resolver, models, commands, metrics, local
    )


async def start(config: NodeConfig) -> NodeProcess:
    """Opens the models dir, starts serving gRPC, connects to the balancer, resumes broken downloads."""
    # Inference and Manifest refuse every caller until the balancer hands this node the fleet token
    # (or the caller presents XLLM_AUTH_TOKEN); health and reflection stay open.
    credentials = NodeCredentials(config.auth_token)
    server = grpc.aio.server(
        options=server_options(config.max_body_mb), interceptors=server_interceptors(credentials)
    )
    port = server.add_insecure_port(config.grpc_listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.grpc_listen}")
    parts = assemble(config, advertised_address(config, port), credentials)
    storage, resolver, link, commands = parts.storage, parts.resolver, parts.link, parts.commands
    metrics_server = None
    if config.metrics_listen:
        metrics_server = MetricsHttpServer(parts.metrics.registry, config.http_limits)
        try:
            await metrics_server.start(config.metrics_listen)
        except OSError as exc:
            await parts.close()
            raise OSError(f"cannot listen on {config.metrics_listen} for metrics: {exc}") from None
        log.info("node.metrics_listening", address=metrics_server.address, path="/metrics")

    bulk_server = None
    if config.bulk_listen:
        bulk_server = BulkServer(resolver.locate, credentials, parts.downloader.partial, config.http_limits)
        try:
            await bulk_server.start(config.bulk_listen)
        except OSError as exc:
            await parts.close()
            raise OSError(
                f"cannot listen on {config.bulk_listen} for bulk transfers: {exc}; give this node its own "
                "XLLM_BULK_PORT (0: any free port), or XLLM_BULK_LISTEN=off"
            ) from None
    bulk_port = bulk_server.port if bulk_server is not None else 0
    manifest_pb2_grpc.add_ManifestServicer_to_server(
        NodeManifestServicer(resolver, storage, bulk_port), server
    )
    inference = NodeInferenceServicer(
        parts.models,
        resolver.resolve,
        lambda: link.node_id,
        metrics=parts.metrics,
        draining=lambda: commands.draining,
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(inference, server)
    health_servicer: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    node = NodeProcess(
        config,
        parts,
        server,
        health_servicer,
        port,
        advertised_address(config, port),
        inference,
        metrics_server,
        bulk_server,
    )
    await resolver.survey()  # the balancer hears at once what this node already holds
    link.start()
    parts.local.start()  # and, once scanned, which models were placed by hand
    for model_id in storage.unfinished():  # a node killed mid-download resumes on its next start
        node.spawn(resolver.resolve(model_id), f"resume {model_id}")
    log.info(
        "node.listening",
        grpc=node.address,
        bulk_port=bulk_port or None,
        models_dir=str(storage.root),
        shared_dir=str(config.shared_dir) if config.shared_dir else None,
        backend=parts.hardware.backend.value,
        balancer=config.balancer,
    )
    return node


async def serve(config: NodeConfig) -> None:
    """Runs the node until SIGINT or SIGTERM, then drains and stops; a second signal stops at once.

    The drain refuses new requests (the balancer retries them elsewhere) and waits up to
    ``drain_timeout_s`` for the requests in flight to finish. Exports traces when the ``OTEL_*``
    variables ask for them (``common.tracing``).
    """
    async with tracing.exporting(tracing.NODE_SERVICE, dict(config.otel)):
        await _serve(config)


async def _serve(config: NodeConfig) -> None:
    node = await start(config)
    first, second = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: (second if first.is_set() else first).set())
    await first.wait()
    log.info("node.stopping", drain_timeout_s=config.drain_timeout_s, in_flight=node.inference.in_flight)
    drain = asyncio.create_task(node.drain(config.drain_timeout_s))
    forced = asyncio.create_task(second.wait())
    done, _ = await asyncio.wait((drain, forced), return_when=asyncio.FIRST_COMPLETED)
    drained = drain in done and drain.exception() is None and drain.result()
    if drain not in done:
        log.warning("node.stop_forced", in_flight=node.inference.in_flight)
    for task in (drain, forced):
        task.cancel()
    await asyncio.gather(drain, forced, return_exceptions=True)
    # Drained: nothing is left to wait for; timed out or forced: the waiting is over.
    await node.stop(grace=5.0 if drained else 0.0)
