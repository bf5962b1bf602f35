"""The node rows: what a replica writes about the node sessions it holds, and how it follows the rows
the other replicas write, so that every replica routes to every node.

What a node reports to the replica holding its session is written to its row (``nodes.live``, a
``NodeSnapshot``) when it changes, and announced on the change bus (``NodeChanged``); the other
replicas re-read the row the notice names. A node's load, which changes with every request, is
announced (``NodeLoadChanged``) but not written. The prompt prefixes a node reports (for cache-aware
routing) are written with its row, like download progress at most once per ``PROGRESS_EVERY_S``, so
every replica routes a conversation's next turn to the node that holds it; a write carries at most
``MAX_REPORTED`` hashes per loaded model, 8 bytes each.

With SQLite there is one balancer: nothing is announced, but sessions are recorded the same way
(``attach``/``detach``), so both engines run the same code.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from balancer.changes import Beat, ChangeBus, NodeChanged, NodeLoadChanged, Rejoined, Resync
from balancer.fleet.view import Fleet, NodeInfo, NodeLoad
from balancer.replicas import Replicas
from balancer.store import Store, StoreUnavailable
from common.types import Backend, Capability, FileFormat, GpuDevice, ModelOnNode, ModelState, Node, NodeState

log = structlog.get_logger(__name__)

PROGRESS_EVERY_S = 1.0  # a node's download progress or prefixes alone are written at most this often


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """What a node reports to the replica holding its session, as other replicas read it."""

    capabilities: frozenset[Capability]
    draining: bool
    models: tuple[ModelOnNode, ...]
    load: NodeLoad
    prefixes: dict[str, frozenset[int]] = field(default_factory=dict)  # model id -> reported hashes
    # What the scheduler places by, from the registration (see ``NodeInfo``), for the acting replica.
    placement: NodeInfo | None = None
    stopping: bool = False  # the node is shutting down: no replica may undo its drain

    @classmethod
    def of(cls, fleet: Fleet, node_id: str) -> NodeSnapshot:
        info = fleet.info(node_id)
        return cls(
            info.capabilities if info is not None else frozenset(),
            fleet.is_draining(node_id),
            tuple(fleet.node_models(node_id)),
            fleet.load(node_id) or NodeLoad(),
            fleet.node_prefixes(node_id),
            None
            if info is None
            else NodeInfo(  # what the scheduler reads, as another replica reads it back: no token
                node_id,
                "",
                labels=dict(info.labels),
                backends=info.backends,
                runtimes=info.runtimes,
                gpus=info.gpus,
                memory_total_mb=info.memory_total_mb,
                formats=info.formats,
            ),
            fleet.is_stopping(node_id),
        )

    def info(self, node_id: str, address: str) -> NodeInfo:
        """The node's ``NodeInfo`` on a replica that does not hold its session (routed calls to it
        present the fleet token: its own token, if it has one, is known only where it registered)."""
        p = self.placement
        if p is None:
            return NodeInfo(node_id, address, self.capabilities)
        return NodeInfo(
            node_id,
            address,
            self.capabilities,
            labels=dict(p.labels),
            backends=p.backends,
            runtimes=p.runtimes,
            gpus=p.gpus,
            memory_total_mb=p.memory_total_mb,
            formats=p.formats,
        )

    def routing_key(self) -> tuple[object, ...]:
        """The part routing depends on: a change here is written at once, progress alone is not."""
        return (
            self.draining,
            self.stopping,
            self.capabilities,
            # pinned: the scheduler's copies; slots: the calls a node takes for the model at once
            tuple((m.model_id, m.state, m.pinned, m.slots) for m in self.models),
        )

    def progress(self) -> tuple[object, ...]:
        """The rest of what is written (the load aside): download progress, errors and prefixes."""
        return (tuple((m.downloaded_bytes, m.total_bytes, m.error) for m in self.models), self.prefixes)

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "capabilities": sorted(c.value for c in self.capabilities),
            "draining": self.draining,
            **({"stopping": True} if self.stopping else {}),
            "models": [
                [m.model_id, m.state.value, m.downloaded_bytes, m.total_bytes, m.error] for m in self.models
            ],
        }
        if self.prefixes:  # packed: 8 bytes a hash, not 20 digits
            body["prefixes"] = {
                model_id: base64.b64encode(b"".join(h.to_bytes(8, "little") for h in sorted(hashes))).decode()
                for model_id, hashes in sorted(self.prefixes.items())
            }
        scheduled = {m.model_id: [m.memory_mb, m.pinned] for m in self.models if m.memory_mb or m.pinned}
        if scheduled:
            body["scheduled"] = scheduled
        slots = {m.model_id: m.slots for m in self.models if m.slots}
        if slots:  # a reader that predates it routes to the node with the node-wide cap
            body["slots"] = slots
        p = self.placement
        if p is not None:
            body["placement"] = {
                "labels": dict(p.labels),
                "backends": [b.value for b in p.backends],
                "runtimes": list(p.runtimes),
                "formats": sorted(f.value for f in p.formats),
                "memory_total_mb": p.memory_total_mb,
                "gpus": [
                    [g.index, g.name, g.memory_total_mb, g.memory_free_mb] for g in self.load.gpus or p.gpus
                ],
            }
        load = self.load
        body["load"] = [
            load.active_requests,
            load.queued_requests,
            load.cpu_percent,
            load.memory_used_mb,
            load.memory_total_mb,
        ]
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, node_id: str, text: str) -> NodeSnapshot:
        """Reads what ``to_json`` wrote; values this version does not know are left out."""
        body = json.loads(text)
        known_caps = {c.value for c in Capability}
        known_states = {s.value for s in ModelState}
        scheduled = body.get("scheduled") or {}
        slots = body.get("slots") or {}
        models = tuple(
            ModelOnNode(
                node_id,
                model_id,
                ModelState(state),
                int(done),
                int(total),
                str(error),
                int((scheduled.get(model_id) or [0, False])[0]),
                bool((scheduled.get(model_id) or [0, False])[1]),
                max(0, int(slots.get(model_id, 0))),
            )
            for model_id, state, done, total, error in body.get("models", [])
            if state in known_states
        )
        placement = None
        p = body.get("placement")
        gpus: tuple[GpuDevice, ...] = ()
        if isinstance(p, dict):
            known_backends = {b.value for b in Backend}
            known_formats = {f.value for f in FileFormat}
            gpus = tuple(GpuDevice(int(i), str(n), int(t), int(f)) for i, n, t, f in p.get("gpus", []))
            placement = NodeInfo(
                node_id,
                "",
                labels={str(k): str(v) for k, v in (p.get("labels") or {}).items()},
                backends=tuple(Backend(b) for b in p.get("backends", []) if b in known_backends),
                runtimes=tuple(str(r) for r in p.get("runtimes", [])),
                gpus=gpus,
                memory_total_mb=int(p.get("memory_total_mb", 0)),
                formats=frozenset(FileFormat(f) for f in p.get("formats", []) if f in known_formats),
            )
        active, queued, cpu, used, total_mb = (body.get("load") or [0, 0, 0.0, 0, 0])[:5]
        prefixes = {}
        for model_id, packed in (body.get("prefixes") or {}).items():
            raw = base64.b64decode(packed)
            prefixes[str(model_id)] = frozenset(
                int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw) - 7, 8)
            )
        return cls(
            frozenset(Capability(c) for c in body.get("capabilities", []) if c in known_caps),
            bool(body.get("draining", False)),
            models,
            NodeLoad(int(active), int(queued), float(cpu), int(used), int(total_mb), gpus),
            prefixes,
            placement,
            bool(body.get("stopping", False)),
        )


@dataclass(frozen=True, slots=True)
class _Written:
    key: tuple[object, ...]  # NodeSnapshot.routing_key
    progress: tuple[object, ...]  # NodeSnapshot.progress
    at: float


class Held(Protocol):
    """The node sessions this replica holds (``balancer.fleet.sessions.NodeSessions``)."""

    def get(self, node_id: str) -> object | None: ...

    def node_ids(self) -> list[str]: ...


class NodeRows:
    """Records the sessions held here in the node rows, and follows the rows other replicas hold."""

    def __init__(
        self, store: Store, fleet: Fleet, replicas: Replicas, held: Held, *, heartbeat_timeout_s: float
    ) -> None:
        self._store = store
        self._fleet = fleet
        self._replicas = replicas
        self._bus: ChangeBus = replicas.bus
        self._held = held
        self._heartbeat_timeout_s = heartbeat_timeout_s  # a handed-over node unheld this long is offline
        self._written: dict[str, _Written] = {}  # node_id -> what was last written for it
        self._loads: dict[str, tuple[int, int]] = {}  # node_id -> (active, queued) last announced
        self._between: dict[str, float] = {}  # node_id -> when it was seen handed over, not yet re-held
        self._bus.subscribe(NodeChanged, self._node_changed)
        self._bus.subscribe(NodeLoadChanged, self._load_changed)
        self._bus.subscribe(Resync, self._resync)
        self._bus.subscribe(Rejoined, self._rejoined)
        self._bus.subscribe(Beat, self._beat)

    # -- what this replica writes ----------------------------------------------------------------

    async def attach(self, node_id: str) -> bool:
        """The node's session opened here: it is online, held by this replica. False if it is unknown."""
        snapshot = NodeSnapshot.of(self._fleet, node_id)
        try:
            if not await self._store.attach_node(node_id, self._replicas.id, snapshot.to_json()):
                return False
        except StoreUnavailable:  # routing follows memory; the resync records it once the store is back
            log.warning("replica.attach_unstored", node_id=node_id)
            return True
        self._written[node_id] = _Written(snapshot.routing_key(), snapshot.progress(), 0.0)
        await self._bus.publish(NodeChanged(node_id))
        return True

    async def detach(self, node_id: str) -> None:
        """The node's session here ended: offline, unless another replica holds it already."""
        self._written.pop(node_id, None)
        self._loads.pop(node_id, None)
        if self._replicas.handing_over:  # the node lives on and attaches elsewhere; the replica's stop
            return  # records the handover
        try:
            await self._store.detach_node(node_id, self._replicas.id)
        except StoreUnavailable:  # the resync records it once the store is back
            log.warning("replica.detach_unstored", node_id=node_id)
            return
        await self._bus.publish(NodeChanged(node_id))
        if self._replicas.shared:  # it may have attached elsewhere before this session noticed it was gone
            await self.refresh(node_id)

    async def reported(self, node_id: str) -> None:
        """A node held here reported (a heartbeat, a model state, a drain): tell the others of a change."""
        if not self._replicas.shared:
            return
        snapshot = NodeSnapshot.of(self._fleet, node_id)
        load = (snapshot.load.active_requests, snapshot.load.queued_requests)
        if self._loads.get(node_id) != load:
            self._loads[node_id] = load
            await self._bus.publish(NodeLoadChanged(node_id, *load))
        # Compared as tuples, not as JSON: this runs for every heartbeat of every node held here.
        key, progress, now = snapshot.routing_key(), snapshot.progress(), time.monotonic()
        last = self._written.get(node_id)
        if last is not None and (
            last.key == key and (last.progress == progress or now - last.at < PROGRESS_EVERY_S)
        ):
            return  # unchanged, or only progress, written a moment ago: a later report carries it
        try:
            if not await self._store.update_node_live(node_id, self._replicas.id, snapshot.to_json()):
                return
        except StoreUnavailable:  # written with a later report once the store is back
            return
        self._written[node_id] = _Written(key, progress, now)
        await self._bus.publish(NodeChanged(node_id))

    # -- what the others write -------------------------------------------------------------------

    async def _node_changed(self, change: NodeChanged) -> None:
        await self.refresh(change.node_id)

    async def _load_changed(self, change: NodeLoadChanged) -> None:
        fleet = self._fleet
        if fleet.remote_replica(change.node_id) is not None:
            old = fleet.load(change.node_id) or NodeLoad()
            fleet.set_load(
                change.node_id, replace(old, active_requests=change.active, queued_requests=change.queued)
            )

    async def refresh(self, node_id: str, node: Node | None = None) -> None:
        """Re-reads one node held elsewhere (a session held here is its own truth)."""
        if self._held.get(node_id) is not None:
            return
        if node is None:
            node = await self._store.get_node(node_id)
        if self._held.get(node_id) is not None:  # it attached here while we read
            return
        fleet = self._fleet
        if node is None:
            fleet.remove(node_id)
            return
        if not node.replica_id and node.state is not NodeState.OFFLINE and fleet.remote_replica(node_id):
            # Handed over by a replica that stopped gracefully: it is alive and about to attach to one
            # of us; keep routing to it meanwhile (``_settle_between`` ends the wait).
            self._between.setdefault(node_id, time.monotonic())
            return
        if (
            node.replica_id
            and node.replica_id != self._replicas.id
            and node.state is not NodeState.OFFLINE
            and node.live
        ):
            self._between.pop(node_id, None)
            snapshot = NodeSnapshot.from_json(node.id, node.live)
            fleet.attached_elsewhere(
                snapshot.info(node.id, node.address),
                node.replica_id,
                models=list(snapshot.models),
                load=snapshot.load,
                draining=snapshot.draining,
                prefixes=snapshot.prefixes,
                stopping=snapshot.stopping,
            )
        elif fleet.remote_replica(node_id) is not None:
            fleet.disconnected(node_id)

    async def _resync(self, _: Resync) -> None:
        nodes = await self._store.list_nodes()
        listed = {n.id for n in nodes}
        for node in nodes:
            held_here = self._held.get(node.id) is not None
            if node.replica_id == self._replicas.id and not held_here:
                await self._store.detach_node(node.id, self._replicas.id)  # a detach the store missed
            elif held_here and not node.replica_id:
                await self.attach(node.id)  # an attach the store missed (an outage)
            else:
                await self.refresh(node.id, node)
        for node_id in self._fleet.remote_nodes():
            if node_id not in listed:
                self._fleet.remove(node_id)

    async def _rejoined(self, _: Rejoined) -> None:
        for node_id in self._held.node_ids():
            await self.attach(node_id)

    async def _beat(self, beat: Beat) -> None:
        if beat.alive is not None:  # the nodes of replicas that stopped beating are offline
            for node_id, replica_id in self._fleet.remote_nodes().items():
                if replica_id not in beat.alive and node_id not in self._between:
                    self._fleet.disconnected(node_id)
        await self._settle_between(self._heartbeat_timeout_s)

    async def _settle_between(self, within_s: float) -> None:
        """A handed-over node that no replica holds again within ``within_s`` is offline."""
        now = time.monotonic()
        for node_id, since in list(self._between.items()):
            if now - since < within_s:
                continue
            del self._between[node_id]
            if await self._store.settle_unheld(node_id):
                log.warning("node.not_taken_over", node_id=node_id, seconds=round(now - since, 1))
                await self._bus.publish(NodeChanged(node_id))
            await self.refresh(node_id)
