"""The node's live link to the balancer: registration, the session stream, commands, and lookups.

``RegisterNode`` first (the id the balancer assigns is saved in ``<home>/node-id`` and reused after a
restart; the fleet tokens it answers with go to ``NodeCredentials``, in memory only, and are renewed
over the session), then a
``NodeSession`` stream: a heartbeat every interval with load and the full per-model picture, a
``model_state`` message whenever a model changes (download progress included), a ``prefixes`` report
whenever the prompt prefixes a loaded model keeps computed change (and every model's report at the
start of each session, since a new session knows none), and commands from the balancer (delete,
prefetch, drain, undrain), each acknowledged once carried out.

The node may know several balancer addresses (replicas sharing one store, so any of them takes it).
When a session that was up breaks, the link registers with the next address at once, so the node is
back in a live replica's rotation within about a second; only when every address has failed in turn
does it wait, with capped exponential backoff, before the next round (``node.balancers.Reattach``).
With one address it retries that one with the same backoff. Lookups (models, peers, the fleet token,
the blob proxy) go to the balancer the session is attached to, and to the others in turn while the
one asked does not answer.

Over 400 lines on purpose: registration, the session, commands and lookups share one state (the node
id, ``connected``, the current balancer); the choice of address already lives in ``node.balancers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Protocol, TypeVar

import grpc
import grpc.aio
import structlog

from common import converters
from common.channels import open_channel
from common.config import NodeConfig
from common.errors import LlmlbError
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import error_from_rpc
from common.types import Capability, FileFormat, Model, ModelOnNode, ModelState
from node.balancers import BalancerChannels, BalancerProxySource, Reattach
from node.blob_sources import BlobSource, BulkSource, ReadBlobSource
from node.hardware import Hardware, offered
from node.model_book import ModelBook
from node.token_auth import NodeCredentials

log = structlog.get_logger(__name__)
T = TypeVar("T")

LOOKUP_TIMEOUT_S = 5.0
# model_state updates are coalesced: at most one per model this often.
STATE_PUSH_INTERVAL_S = 0.2
# Prefix reports are coalesced too: a burst of requests sends at most one report per model this often.
PREFIX_PUSH_INTERVAL_S = 0.1


class CommandHandler(Protocol):
    """What the node does when the balancer says so; each returns when the work is done."""

    async def delete_model(self, model_id: str) -> None: ...

    async def prefetch(self, model_id: str, *, pin: bool = False) -> None: ...

    async def drain(self) -> None: ...

    async def undrain(self) -> None: ...

    async def unload(self, model_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Load:
    active_requests: int = 0
    queued_requests: int = 0
    kv_cache_percent: float = 0.0  # the fullest key/value cache of a model server it runs (vLLM)


def version() -> str:
    try:
        return metadata.version("llmlb")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def host_load() -> tuple[float, int, int]:
    """CPU use (percent over all cores, from the 1-minute load average) and host memory used/total MB."""
    try:
        cpu = min(100.0, 100.0 * os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        cpu = 0.0
    total = available = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key == "MemTotal":
                    total = int(value.split()[0]) // 1024
                elif key == "MemAvailable":
                    available = int(value.split()[0]) // 1024
    except OSError:
        pass
    return cpu, max(0, total - available), total


class BalancerLink:
    """One node's connection to its balancer; reconnects by itself until ``stop``."""

    def __init__(
        self,
        config: NodeConfig,
        hardware: Hardware,
        advertise: str,
        states: ModelBook,
        handler: CommandHandler | None = None,
        *,
        runtimes: Sequence[str] = (),
        capabilities: Sequence[Capability] = (),
        formats: Sequence[FileFormat] = (),
        load: Callable[[], Load] = Load,
        runtime_states: Callable[[], Mapping[str, ModelOnNode]] = dict,
        draining: Callable[[], bool] = lambda: False,
        stopping: Callable[[], bool] = lambda: False,
        credentials: NodeCredentials | None = None,
        budget_mb: int = 0,
        model_memory: Callable[[], Mapping[str, int]] = dict,
        pinned: Callable[[], frozenset[str]] = frozenset,
        model_slots: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self._config = config
        # The operator's memory cap (0: none): what registration and heartbeats offer (``offered``).
        self._budget_mb = budget_mb
        self._model_memory = model_memory  # model id -> MB its loaded runtimes take
        self._pinned = pinned
        self._model_slots = model_slots  # model id -> sequences its loaded runtime runs at once
        self._hardware = hardware
        self._advertise = advertise
        self._states = states
        self.handler = handler  # set before start(): commands arrive only once the session is up
        self._runtimes = list(runtimes)
        self._capabilities = list(capabilities)
        self._formats = list(formats)
        self._load = load
        self._runtime_states = runtime_states
        self._draining = draining
        self._stopping = stopping  # shutting down: the drain cannot be undone
        # Shared with the node's server door: each registration hands it the fleet token.
        self.credentials = credentials if credentials is not None else NodeCredentials(config.auth_token)
        self._api_key = config.api_key
        self._balancers = BalancerChannels(
            config.balancers,
            lambda address: open_channel(
                address,
                api_key=config.api_key.reveal(),
                tls_ca=config.tls_ca,
                tls_cert=config.tls_cert,
                tls_key=config.tls_key,
            ),
        )
        self._peers: dict[str, grpc.aio.Channel] = {}  # address -> channel
        self.node_id = config.node_id or self._saved_node_id()
        self.connected = asyncio.Event()
        self._heartbeat_s = 1.0
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._dirty: dict[str, ModelOnNode] = {}
        self._wake = asyncio.Event()
        self._outbox: asyncio.Queue[rpb.NodeMessage] = asyncio.Queue()
        self._running: set[int] = set()
        self._jobs: set[asyncio.Task[None]] = set()
        self._beat_now = False
        # Prefix reports arrive from runtime worker threads: kept under a lock, sent by the session.
        self._prefix_lock = threading.Lock()
        self._prefixes: dict[str, tuple[int, ...]] = {}  # model id -> the hashes last reported to us
        self._prefixes_dirty: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local_models: list[Model] = []  # the models placed by hand, as last found
        states.subscribe(self._changed)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.handler is None:
            raise RuntimeError("BalancerLink.start() needs a command handler")
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="balancer-link")

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        for channel in self._peers.values():
            await channel.close(None)
        await self._balancers.close()

    # -- which balancer -------------------------------------------------------------------------

    @property
    def balancer(self) -> str:
        """The address of the balancer the node is attached to (or last heard from)."""
        return self._balancers.address

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to ``balancer``: what every call the node makes to a balancer goes through."""
        return self._balancers.channel

    async def _ask(self, ask: Callable[[rgrpc.RegistryAsyncStub], Awaitable[T]]) -> T:
        # While a session is up it decides which balancer is current; without one, whoever answers.
        return await self._balancers.ask(ask, settle=not self.connected.is_set())

    # -- the session loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        reattach = Reattach(len(self._balancers.addresses))
        index = self._balancers.current
        while True:
            started = time.monotonic()
            if await self._attach(index):
                return
            up_s = time.monotonic() - started if self.connected.is_set() else None
            self.connected.clear()
            previous = self._balancers.addresses[index]
            index, delay = reattach.after(index, up_s)
            if up_s is not None and delay == 0.0:
                log.info(
                    "balancer.failover",
                    node_id=self.node_id,
                    previous=previous,
                    next=self._balancers.addresses[index],
                )
            if delay:
                await asyncio.sleep(delay)

    async def _attach(self, index: int) -> bool:
        """Registers with the balancer at ``index`` and runs the session until it ends.

        True when the node must stop trying (an operator removed it); ``connected`` is still set when
        the session had been up.
        """
        address = self._balancers.addresses[index]
        try:
            await self._register(index)
            self._balancers.current = index
            await self._session(index)
            log.warning("balancer.session_ended", node_id=self.node_id, balancer=address)
        except grpc.aio.AioRpcError as exc:
            if self.connected.is_set() and exc.code() == grpc.StatusCode.NOT_FOUND:
                # An operator removed this node (llmlb nodes rm): it comes back only when restarted.
                log.warning("balancer.removed", node_id=self.node_id, balancer=address, detail=exc.details())
                self.connected.clear()
                return True
            log.warning("balancer.unreachable", balancer=address, error=exc.code().name, detail=exc.details())
        except LlmlbError as exc:
            log.warning("balancer.refused", balancer=address, error=exc.message)
        return False

    def _saved_node_id(self) -> str:
        try:
            return self._config.node_id_file.read_text().strip()
        except OSError:
            return ""

    async def _register(self, index: int) -> None:
        offer = offered(self._hardware, self._budget_mb, sum(self._model_memory().values()))
        reply = await self._balancers.registry(index).RegisterNode(
            rpb.RegisterNodeRequest(
                node_id=self.node_id,
                address=self._advertise,
                backends=[converters.backend_to_pb(b) for b in self._hardware.backends],
                gpus=[converters.gpu_to_pb(g) for g in offer.gpus],
                runtimes=self._runtimes,
                capabilities=converters.capabilities_to_pb(self._capabilities),
                formats=converters.formats_to_pb(self._formats),
                version=version(),
                auth_token=self._config.auth_token.reveal(),
                memory_total_mb=offer.memory_total_mb,
                labels=dict(self._config.labels),
                memory_budget_mb=self._budget_mb,
            ),
            timeout=LOOKUP_TIMEOUT_S,
        )
        if reply.node_id != self.node_id:
            self._config.node_id_file.parent.mkdir(parents=True, exist_ok=True)
            self._config.node_id_file.write_text(reply.node_id + "\n")
        self.node_id = reply.node_id
        if reply.HasField("fleet_tokens"):
            self._hold(reply.fleet_tokens)
        else:  # an older balancer: one token that never changes
            self.credentials.set_fleet_token(reply.fleet_token)
        self._heartbeat_s = max(0.05, reply.heartbeat_interval_ms / 1000)
        log.info(
            "balancer.registered",
            node_id=self.node_id,
            balancer=self._balancers.addresses[index],
            address=self._advertise,
            fleet_token="received" if reply.fleet_token else "none",  # never the token itself
        )

    async def _session(self, index: int) -> None:
        while not self._outbox.empty():  # acks meant for a dead session: the commands come again
            self._outbox.get_nowait()
        call = self._balancers.registry(index).NodeSession(self._outgoing())
        async for msg in call:
            kind = msg.WhichOneof("body")
            if kind == "accepted":
                self.connected.set()
                log.info(
                    "balancer.connected", node_id=self.node_id, balancer=self._balancers.addresses[index]
                )
            elif kind == "command":
                self._start_command(msg.command)
            elif kind == "fleet_token":  # renewed before the old ones run out, or rotated
                self._hold(msg.fleet_token)

    def _hold(self, tokens: rpb.FleetToken) -> None:
        """The fleet tokens the balancer sent, in memory only, each accepted for the time it gave."""
        self.credentials.set_fleet_tokens(
            tokens.token, ((t.token, t.valid_ms / 1000) for t in tokens.accepted), replaces=tokens.replaces
        )

    async def _outgoing(self) -> AsyncIterator[rpb.NodeMessage]:
        yield rpb.NodeMessage(hello=rpb.NodeHello(node_id=self.node_id))
        yield self._heartbeat()
        for report in self._prefix_reports(everything=True):  # this session knows no prefixes yet
            yield report
        yield self._local_report()  # nor which models were placed by hand
        next_beat = time.monotonic() + self._heartbeat_s
        next_push = next_prefix_push = 0.0
        while True:
            self._wake.clear()
            while not self._outbox.empty():
                yield self._outbox.get_nowait()
            now = time.monotonic()
            if self._dirty and now >= next_push:
                dirty, self._dirty = self._dirty, {}
                memory, pinned, slots = self._model_memory(), self._pinned(), self._model_slots()
                for state in dirty.values():
                    yield rpb.NodeMessage(model_state=self._status_pb(state, memory, pinned, slots))
                next_push = now + STATE_PUSH_INTERVAL_S  # a burst of progress coalesces
            if self._prefixes_dirty and now >= next_prefix_push:
                for report in self._prefix_reports(everything=False):
                    yield report
                next_prefix_push = now + PREFIX_PUSH_INTERVAL_S
            if now >= next_beat or self._beat_now:
                self._beat_now = False
                yield self._heartbeat()
                next_beat = now + self._heartbeat_s
            until = min(next_beat, next_push) if self._dirty else next_beat
            if self._prefixes_dirty:
                until = min(until, next_prefix_push)
            if self._outbox.empty():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, until - time.monotonic()))

    def _heartbeat(self) -> rpb.NodeMessage:
        cpu, used, total = host_load()
        load = self._load()
        picture = {s.model_id: s for s in self._states.snapshot()}
        picture.update(self._runtime_states())  # loading / ready / failed from the runtimes win
        memory, pinned, slots = self._model_memory(), self._pinned(), self._model_slots()
        models = [
            self._status_pb(s, memory, pinned, slots)
            for s in picture.values()
            if s.state is not ModelState.ABSENT
        ]
        offer = offered(
            self._hardware, self._budget_mb, sum(memory.values()), total - used if total else None
        )
        gpus = []
        if self._budget_mb:  # capped: the cap is the total, what loaded models take is the use
            total, used = offer.memory_total_mb, offer.memory_total_mb - offer.memory_free_mb
            gpus = [converters.gpu_to_pb(g) for g in offer.gpus]
        return rpb.NodeMessage(
            heartbeat=rpb.Heartbeat(
                load=pb.NodeLoad(
                    active_requests=load.active_requests,
                    queued_requests=load.queued_requests,
                    cpu_percent=cpu,
                    memory_used_mb=used,
                    memory_total_mb=total,
                    gpus=gpus,
                    kv_cache_percent=load.kv_cache_percent,
                ),
                models=models,
                draining=self._draining(),
                stopping=self._stopping(),
            )
        )

    def _status_pb(
        self, s: ModelOnNode, memory: Mapping[str, int], pinned: frozenset[str], slots: Mapping[str, int]
    ) -> pb.ModelNodeStatus:
        """One model's report with what it takes in memory, whether the scheduler's copy is pinned, and
        the sequences its loaded runtime runs at once (0 while not loaded)."""
        full = replace(
            s,
            node_id=self.node_id,
            memory_mb=memory.get(s.model_id, 0),
            pinned=s.model_id in pinned,
            slots=slots.get(s.model_id, 0),
        )
        return converters.model_on_node_to_pb(full)

    def beat_now(self) -> None:
        """Sends a heartbeat at once, e.g. so the balancer learns of a drain before the next beat."""
        self._beat_now = True
        self._wake.set()

    def prefixes_changed(self, model_id: str, hashes: Sequence[int]) -> None:
        """The prompt prefixes ``model_id`` keeps changed (empty: none); safe from any thread."""
        with self._prefix_lock:
            if hashes:
                self._prefixes[model_id] = tuple(hashes)
            elif self._prefixes.pop(model_id, None) is None:
                return  # nothing was reported for it: nothing to take back
            self._prefixes_dirty.add(model_id)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile: nobody to tell
                loop.call_soon_threadsafe(self._wake.set)

    def _prefix_reports(self, everything: bool) -> Iterator[rpb.NodeMessage]:
        """Reports of the models whose prefixes changed since the last ones sent (or of every model)."""
        with self._prefix_lock:
            names = set(self._prefixes) if everything else set(self._prefixes_dirty)
            self._prefixes_dirty.clear()
            reports = [(m, self._prefixes.get(m, ())) for m in sorted(names)]
        for model_id, hashes in reports:
            yield rpb.NodeMessage(prefixes=rpb.PrefixReport(model_id=model_id, hashes=hashes))

    def local_models_changed(self, models: Sequence[Model]) -> None:
        """The models placed by hand changed (``node.local_models``): the balancer hears the new list."""
        self._local_models = list(models)
        self._outbox.put_nowait(self._local_report())
        self._wake.set()

    def _local_report(self) -> rpb.NodeMessage:
        models = [converters.model_to_pb(m) for m in self._local_models]
        return rpb.NodeMessage(local_models=rpb.LocalModels(models=models))

    def _changed(self, state: ModelOnNode) -> None:
        self._dirty[state.model_id] = state
        self._wake.set()

    # -- commands -------------------------------------------------------------------------------

    def _start_command(self, command: rpb.NodeCommand) -> None:
        if command.command_id in self._running:
            return  # re-sent on a new session while still being carried out
        self._running.add(command.command_id)
        job = asyncio.create_task(self._carry_out(command))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _carry_out(self, command: rpb.NodeCommand) -> None:
        kind = command.WhichOneof("body")
        handler = self.handler
        assert handler is not None  # start() refuses to run without one
        ok, error = True, ""
        try:
            if kind == "delete_model":
                await handler.delete_model(command.delete_model.model_id)
            elif kind == "prefetch" and command.prefetch.pin:
                await handler.prefetch(command.prefetch.model_id, pin=True)
            elif kind == "prefetch":
                await handler.prefetch(command.prefetch.model_id)
            elif kind == "drain":
                await handler.drain()
            elif kind == "undrain":
                await handler.undrain()
            elif kind == "unload":
                await handler.unload(command.unload.model_id)
            else:
                ok, error = False, f"unknown command {kind!r}"
        except LlmlbError as exc:
            ok, error = False, exc.message
        except Exception as exc:
            log.exception("command.failed", command_id=command.command_id, kind=kind)
            ok, error = False, repr(exc)
        finally:
            self._running.discard(command.command_id)
        log.info("command.done", command_id=command.command_id, kind=kind, ok=ok, error=error or None)
        self._outbox.put_nowait(
            rpb.NodeMessage(ack=rpb.CommandAck(command_id=command.command_id, ok=ok, error=error))
        )
        self._wake.set()

    # -- lookups the resolver makes ---------------------------------------------------------------

    async def get_model(self, model_id: str) -> Model:
        try:
            reply = await self._ask(
                lambda registry: registry.GetModel(
                    rpb.GetModelRequest(model_id=model_id), timeout=LOOKUP_TIMEOUT_S
                )
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return converters.model_from_pb(reply)

    def swarm_name(self) -> str:
        """This node's source name as its peers see it, once the balancer lists it; else empty."""
        return f"peer:{self.node_id}" if self.node_id and self.connected.is_set() else ""

    async def peer_sources(self, model_id: str) -> list[BlobSource]:
        """Online nodes other than this one that hold the model (present, loading or ready), and
        those still downloading it (the swarm: they serve the ranges they hold, over bulk only)."""
        try:
            model = await self._ask(
                lambda registry: registry.GetModel(
                    rpb.GetModelRequest(model_id=model_id), timeout=LOOKUP_TIMEOUT_S
                )
            )
            whole = (pb.MODEL_STATE_PRESENT, pb.MODEL_STATE_READY, pb.MODEL_STATE_LOADING)
            holders = {
                n.node_id: n.state == pb.MODEL_STATE_DOWNLOADING  # node id -> still downloading
                for n in model.nodes
                if (n.state in whole or n.state == pb.MODEL_STATE_DOWNLOADING) and n.node_id != self.node_id
            }
            if not holders:
                return []
            nodes = await self._ask(
                lambda registry: registry.ListNodes(rpb.ListNodesRequest(), timeout=LOOKUP_TIMEOUT_S)
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        if not self.credentials.has_fleet_token:  # not registered (``xllm pull``): ask for the token
            await self._fetch_fleet_token()
        peers = [n for n in nodes.nodes if n.id in holders and n.state == pb.NODE_STATE_ONLINE and n.address]
        sources = await asyncio.gather(*(self._peer_source(n, partial=holders[n.id]) for n in peers))
        found: list[BlobSource] = [s for s in sources if s is not None]
        random.shuffle(found)  # spread the fetches of many nodes over the holders
        return found

    async def _peer_source(self, node: pb.Node, *, partial: bool) -> BlobSource | None:
        """The peer's bulk server when it runs one, else its ``ReadBlob`` (older nodes, or bulk off);
        a peer still downloading is a source only through its bulk server (ReadBlob serves whole files)."""
        name, channel = f"peer:{node.id}", self._peer_channel(node.address)
        try:
            # Asked each time: a peer restarted on the same address has a new bulk port.
            reply = await mgrpc.ManifestStub(channel).GetBulkEndpoint(
                mpb.GetBulkEndpointRequest(), timeout=LOOKUP_TIMEOUT_S
            )
            port = reply.port
        except grpc.aio.AioRpcError as exc:
            log.info("peer.no_bulk_path", peer=node.id, code=exc.code().name)
            port = 0
        if port <= 0:
            return None if partial else ReadBlobSource(name, channel)
        host = node.address.rpartition(":")[0]
        return BulkSource(name, host, port, self.credentials.for_peers, partial=partial)

    async def _fetch_fleet_token(self) -> None:
        """The fleet token without registering; without it, peers are tried with ``XLLM_AUTH_TOKEN``."""
        try:
            reply = await self._ask(
                lambda registry: registry.GetFleetToken(rpb.GetFleetTokenRequest(), timeout=LOOKUP_TIMEOUT_S)
            )
        except grpc.aio.AioRpcError as exc:  # an older balancer, or a key without the node scope
            log.warning("balancer.fleet_token_unavailable", error=error_from_rpc(exc).message)
            return
        if reply.accepted:
            self._hold(reply)
        else:  # an older balancer
            self.credentials.set_fleet_token(reply.token)

    def _peer_channel(self, address: str) -> grpc.aio.Channel:
        """One channel per peer, presenting the fleet token current at each call (it rotates; see
        ``NodeCredentials.for_peers``).

        A peer that refuses it answers UNAUTHENTICATED; the download moves on to the next source.
        """
        channel = self._peers.get(address)
        if channel is None:
            channel = self._peers[address] = open_channel(address, api_key=self.credentials.for_peers)
        return channel

    def proxy_source(self) -> BlobSource:
        """The balancer's origin proxy, read through whichever balancer is current when a read starts."""
        # The balancer's bulk proxy takes the node's key, or the fleet token when keys are not used.
        return BalancerProxySource(
            self._balancers, lambda: self._api_key.reveal() or self.credentials.for_peers()
        )
