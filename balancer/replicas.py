"""Replicas: several balancers on one PostgreSQL database, each serving both doors, all routing to
every node.

Each replica holds the sessions of the nodes attached to it. What those nodes report is written to
their rows (``nodes.live``, a ``NodeSnapshot``) when it changes, and every change anyone makes is
announced with PostgreSQL's LISTEN/NOTIFY on one channel; the other replicas re-read what the notice
names. Nothing rides on a notice alone: a periodic resync re-reads everything, which also catches the
notices lost while a connection was down. A node's load, which changes with every request, is
announced but not written. The prompt prefixes a node reports (for cache-aware routing) are written
with its row, like download progress at most once per ``PROGRESS_EVERY_S``, so every replica routes a
conversation's next turn to the node that holds it; a write carries at most ``MAX_REPORTED`` hashes
per loaded model, 8 bytes each.

Each replica beats its own row in ``balancer_replicas`` every second. A replica silent past the
heartbeat timeout is taken as dead: any other replica releases it, and the nodes it held are offline
until they attach to a live replica (they do by themselves, see ``node.link``).

With SQLite there is one balancer: nothing is announced or listened to, but sessions are recorded the
same way (``attach``/``detach``), so both engines run the same code.

Over 400 lines on purpose: attaching, announcing, listening, resyncing, beating and handing over all
read and write one replica's view of who holds which node; the snapshot format and the change
vocabulary already live apart (``NodeSnapshot`` here, ``changes.py``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from balancer import node_owners
from balancer.changes import Change
from balancer.fleet import Fleet, ModelOnNode, NodeInfo, NodeLoad
from balancer.store import Store, StoreUnavailable
from balancer.store.engine import is_postgresql
from common.errors import LlmlbError
from common.types import Backend, Capability, FileFormat, GpuDevice, ModelState, Node, NodeState

if TYPE_CHECKING:
    from balancer.parts import BalancerParts

log = structlog.get_logger(__name__)

CHANNEL = "llmlb_changes"
BEAT_S = 1.0  # how often a replica beats its row and looks for replicas that stopped beating
RESYNC_S = 5.0  # how often a replica re-reads everything, in case a notice was lost
PROGRESS_EVERY_S = 1.0  # a node's download progress or prefixes alone are written at most this often
CONNECT_TIMEOUT_S = 5.0
# What a store or listener call raises when the database cannot be reached or refuses.
STORE_ERRORS = (LlmlbError, SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


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


def new_replica_id() -> str:
    """A name for this process among the replicas: host, pid and a random tail (it never restarts)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


class Replicas:
    """This balancer's part among the replicas of one store: records the sessions it holds, tells the
    others what it changed, and follows what they change."""

    def __init__(self, store: Store, fleet: Fleet, *, database_url: str, timeout_s: float) -> None:
        self.id = new_replica_id()
        self.shared = is_postgresql(make_url(database_url))
        self._store = store
        self._fleet = fleet
        self._url = database_url
        self._timeout_s = timeout_s  # a replica silent this long is dead
        self._parts: BalancerParts | None = None
        self._conn: asyncpg.Connection | None = None
        self._conn_lock = asyncio.Lock()  # an asyncpg connection runs one query at a time
        self._inbox: asyncio.Queue[tuple[Change, str]] = asyncio.Queue()
        self._written: dict[str, _Written] = {}  # node_id -> what was last written for it
        self._loads: dict[str, tuple[int, int]] = {}  # node_id -> (active, queued) last announced
        self._beating_since: float | None = None  # since when beats succeed without a gap
        self._handing_over = False  # stopping gracefully: the nodes held here stay online for others
        self._between: dict[str, float] = {}  # node_id -> when it was seen handed over, not yet re-held
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, parts: BalancerParts) -> None:
        """Records this replica, forgets the ones that are gone, learns every other replica's nodes."""
        self._parts = parts
        await self._store.replica_beat(self.id)
        self._beating_since = time.monotonic()
        if self.shared:
            await self._release_stale()
        else:  # one balancer per SQLite file: whatever ran before is gone
            for other in await self._store.replicas():
                if other != self.id:
                    await self._store.release_replica(other)
        await self._store.release_unattached()
        if self.shared:
            await self._listen()
            await self._resync_nodes()
            self._spawn(self._apply_loop())
            self._spawn(self._beat_loop())
            self._spawn(self._resync_loop())
        log.info("replica.started", replica_id=self.id, shared=self.shared)

    def begin_stop(self) -> None:
        """The balancer stops gracefully: the sessions it closes next are handed over, not ended.

        Those nodes are alive and attach to another replica within a second; marked offline, every
        other replica would stop routing to them meanwhile. So they stay online in the store, held by
        no replica (``stop`` records that), and the others keep routing to them until one of them
        holds the node again, or the heartbeat timeout passes without that.
        """
        self._handing_over = self.shared

    async def stop(self) -> None:
        """Stops following the others and gives up this replica's row (its sessions are closed first)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            if self._handing_over:
                for node_id in await self._store.hand_over(self.id):
                    await self.publish(Change.NODE, node_id)
            else:
                await self._store.release_replica(self.id)
        except STORE_ERRORS as exc:  # the others release it once its beats stop
            log.warning("replica.release_failed", replica_id=self.id, error=str(exc))
        if self._conn is not None:
            try:
                await self._conn.close(timeout=CONNECT_TIMEOUT_S)
            except STORE_ERRORS:  # already broken (the database went away): nothing left to close
                self._conn.terminate()
            self._conn = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what this replica tells the others -----------------------------------------------------

    async def publish(self, kind: Change, subject: str = "") -> None:
        """Announces a committed change to the other replicas; never raises (the resync catches up)."""
        conn = self._conn
        if not self.shared or conn is None or conn.is_closed():
            return
        try:
            async with self._conn_lock:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{self.id} {kind.value} {subject}")
        except STORE_ERRORS as exc:
            log.warning("replica.publish_failed", kind=kind.value, subject=subject, error=str(exc))

    async def attach(self, node_id: str) -> bool:
        """The node's session opened here: it is online, held by this replica. False if it is unknown."""
        snapshot = NodeSnapshot.of(self._fleet, node_id)
        try:
            if not await self._store.attach_node(node_id, self.id, snapshot.to_json()):
                return False
        except StoreUnavailable:  # routing follows memory; the resync records it once the store is back
            log.warning("replica.attach_unstored", node_id=node_id)
            return True
        self._written[node_id] = _Written(snapshot.routing_key(), snapshot.progress(), 0.0)
        await self.publish(Change.NODE, node_id)
        return True

    async def detach(self, node_id: str) -> None:
        """The node's session here ended: offline, unless another replica holds it already."""
        self._written.pop(node_id, None)
        self._loads.pop(node_id, None)
        if self._handing_over:  # the node lives on and attaches elsewhere; ``stop`` records the handover
            return
        try:
            await self._store.detach_node(node_id, self.id)
        except StoreUnavailable:  # the resync records it once the store is back
            log.warning("replica.detach_unstored", node_id=node_id)
            return
        await self.publish(Change.NODE, node_id)
        if self.shared:  # it may have attached elsewhere before this session noticed it was gone
            await self._refresh_node(node_id)

    async def reported(self, node_id: str) -> None:
        """A node held here reported (a heartbeat, a model state, a drain): tell the others of a change."""
        if not self.shared:
            return
        snapshot = NodeSnapshot.of(self._fleet, node_id)
        load = (snapshot.load.active_requests, snapshot.load.queued_requests)
        if self._loads.get(node_id) != load:
            self._loads[node_id] = load
            await self.publish(Change.LOAD, f"{node_id} {load[0]} {load[1]}")
        # Compared as tuples, not as JSON: this runs for every heartbeat of every node held here.
        key, progress, now = snapshot.routing_key(), snapshot.progress(), time.monotonic()
        last = self._written.get(node_id)
        if last is not None and (
            last.key == key and (last.progress == progress or now - last.at < PROGRESS_EVERY_S)
        ):
            return  # unchanged, or only progress, written a moment ago: a later report carries it
        try:
            if not await self._store.update_node_live(node_id, self.id, snapshot.to_json()):
                return
        except StoreUnavailable:  # written with a later report once the store is back
            return
        self._written[node_id] = _Written(key, progress, now)
        await self.publish(Change.NODE, node_id)

    # -- what the others tell this replica ------------------------------------------------------

    async def _listen(self) -> None:
        dsn = make_url(self._url).set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(
            dsn, timeout=CONNECT_TIMEOUT_S, server_settings={"application_name": "llmlb-replica-feed"}
        )
        await conn.add_listener(CHANNEL, self._heard)
        self._conn = conn

    def _heard(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        sender, _, rest = payload.partition(" ")
        kind, _, subject = rest.partition(" ")
        if sender == self.id:
            return
        try:
            change = Change(kind)
        except ValueError:  # from a newer replica: the resync covers whatever it meant
            log.debug("replica.unknown_change", kind=kind)
            return
        self._inbox.put_nowait((change, subject))

    async def _apply_loop(self) -> None:
        while True:
            change, subject = await self._inbox.get()
            try:
                await self.apply(change, subject)
            except STORE_ERRORS as exc:  # the store went away: the resync after it returns catches up
                log.warning("replica.apply_failed", change=change.value, subject=subject, error=str(exc))

    async def apply(self, change: Change, subject: str) -> None:
        """Follows one change another replica announced."""
        parts = self._parts
        assert parts is not None, "start() binds the parts first"
        fleet, sessions = self._fleet, parts.sessions
        if change is Change.MODEL:
            if not await parts.catalog.refresh(subject):
                fleet.forget_model(subject)
            sessions.notify_all()  # a delete or pull queued commands for nodes held here
        elif change is Change.KEY:
            parts.keys.forget()
            self._spawn(node_owners.follow_revocations(parts))  # a rotated fleet token, a revoked owner
        elif change is Change.COMMANDS:
            sessions.notify(subject) if subject else sessions.notify_all()
        elif change is Change.DRAIN:
            session = sessions.get(subject)
            fleet.set_draining(subject, True)
            if session is not None:  # held here: a heartbeat saying otherwise must not undo it
                session.draining = True
                session.wake.set()
                await self.reported(subject)
        elif change is Change.UNDRAIN:
            session = sessions.get(subject)
            fleet.set_draining(subject, False)
            if session is not None:
                session.draining = False
                session.wake.set()
                await self.reported(subject)
        elif change is Change.REMOVE:
            if sessions.get(subject) is not None:
                self._spawn(self._end_removed(subject))
            else:
                fleet.remove(subject)
        elif change is Change.NODE:
            await self._refresh_node(subject)
        elif change is Change.LOAD:
            node_id, active, queued = [*subject.split(" "), "0", "0"][:3]
            if fleet.remote_replica(node_id) is not None:
                old = fleet.load(node_id) or NodeLoad()
                fleet.set_load(
                    node_id, replace(old, active_requests=int(active), queued_requests=int(queued))
                )

    async def _end_removed(self, node_id: str) -> None:
        parts = self._parts
        assert parts is not None
        await parts.sessions.end(node_id, parts.config.heartbeat_timeout_ms / 1000)
        self._fleet.remove(node_id)

    async def _refresh_node(self, node_id: str, node: Node | None = None) -> None:
        """Re-reads one node held elsewhere (a session held here is its own truth)."""
        parts = self._parts
        if parts is None or parts.sessions.get(node_id) is not None:
            return
        if node is None:
            node = await self._store.get_node(node_id)
        if parts.sessions.get(node_id) is not None:  # it attached here while we read
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
            and node.replica_id != self.id
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

    async def _resync_nodes(self) -> None:
        parts = self._parts
        assert parts is not None
        nodes = await self._store.list_nodes()
        listed = {n.id for n in nodes}
        for node in nodes:
            held_here = parts.sessions.get(node.id) is not None
            if node.replica_id == self.id and not held_here:
                await self._store.detach_node(node.id, self.id)  # a detach the store missed (an outage)
            elif held_here and not node.replica_id:
                await self.attach(node.id)  # an attach the store missed (an outage)
            else:
                await self._refresh_node(node.id, node)
        for node_id in self._fleet.remote_nodes():
            if node_id not in listed:
                self._fleet.remove(node_id)

    async def resync(self) -> None:
        """Re-reads the catalogue, the keys and every node; wakes every session for queued commands."""
        parts = self._parts
        assert parts is not None
        before = {m.id for m in await parts.catalog.list_models()}
        await parts.catalog.load()
        after = {m.id for m in await parts.catalog.list_models()}
        for model_id in before - after:
            self._fleet.forget_model(model_id)
        parts.keys.forget()
        await node_owners.follow_revocations(parts)
        await self._resync_nodes()
        # In case a COMMANDS notice was lost: the sessions with commands waiting look again.
        parts.sessions.notify_many(await self._store.nodes_with_commands())

    # -- liveness -------------------------------------------------------------------------------

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(BEAT_S)
            try:
                await self._beat()
            except STORE_ERRORS as exc:
                if self._beating_since is not None:
                    log.warning("replica.beat_failed", replica_id=self.id, error=str(exc))
                self._beating_since = None

    async def _beat(self) -> None:
        parts = self._parts
        assert parts is not None
        if not await self._store.replica_beat(self.id):  # released by the others as dead: hold our own again
            log.warning("replica.rejoined", replica_id=self.id)
            for node_id in parts.sessions.node_ids():
                await self.attach(node_id)
        if self._beating_since is None:
            self._beating_since = time.monotonic()
        if self._conn is None or self._conn.is_closed():
            await self._listen()
            log.info("replica.listening_again", replica_id=self.id)
            await self.resync()  # notices sent while the connection was down are lost
        # After an outage nobody could beat: wait a full timeout of our own beats before judging others.
        if time.monotonic() - self._beating_since >= self._timeout_s:
            await self._release_stale()
        await self._settle_between(parts.config.heartbeat_timeout_ms / 1000)

    async def _settle_between(self, within_s: float) -> None:
        """A handed-over node that no replica holds again within ``within_s`` is offline."""
        now = time.monotonic()
        for node_id, since in list(self._between.items()):
            if now - since < within_s:
                continue
            del self._between[node_id]
            if await self._store.settle_unheld(node_id):
                log.warning("node.not_taken_over", node_id=node_id, seconds=round(now - since, 1))
                await self.publish(Change.NODE, node_id)
            await self._refresh_node(node_id)

    async def _release_stale(self) -> None:
        """Releases every replica silent past the timeout, and drops the nodes they held."""
        for replica_id in await self._store.stale_replicas(self._timeout_s):
            if replica_id == self.id:
                continue
            released = await self._store.release_replica(replica_id)
            log.warning("replica.gone", replica_id=replica_id, nodes=released)
            for node_id in released:
                await self.publish(Change.NODE, node_id)
        alive = set(await self._store.replicas())
        for node_id, replica_id in self._fleet.remote_nodes().items():
            if replica_id not in alive and node_id not in self._between:
                self._fleet.disconnected(node_id)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_S)
            try:
                await self.resync()
            except STORE_ERRORS as exc:
                log.warning("replica.resync_failed", replica_id=self.id, error=str(exc))
