"""Open node sessions: who is connected, when each was last heard, and how to wake its sender.

A node is in rotation exactly while its session is open; the session ends when the stream drops or
the node stays silent past the heartbeat timeout.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from balancer.changes import (
    ChangeBus,
    CommandsQueued,
    ModelChanged,
    NodeDrained,
    NodeRemoved,
    NodeUndrained,
    Resync,
)
from balancer.fleet.rows import NodeRows
from balancer.fleet.view import Fleet
from balancer.replicas import Replicas
from balancer.store import Store
from common.types import NodeCommand

log = structlog.get_logger(__name__)


@dataclass(eq=False, slots=True)
class Session:
    node_id: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_seen: float = field(default_factory=time.monotonic)
    sent: set[int] = field(default_factory=set)  # command ids delivered on this session
    stopped: bool = False  # replaced by a newer session, or the balancer is stopping
    ending: bool = False  # the node was removed: send what is queued, then close the stream
    revoked: bool = False  # the key the node registered with was revoked: close the stream now
    draining: bool = False  # told to drain: a heartbeat saying otherwise must not undo it
    batched: bool = False  # woken with many others: its next queue read is the one shared read
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def heard(self) -> None:
        self.last_seen = time.monotonic()


class NodeSessions:
    """The node sessions this replica holds; recorded in the node rows (``rows``), and following what
    other replicas publish about nodes on the change bus."""

    def __init__(self, store: Store, fleet: Fleet, replicas: Replicas, *, heartbeat_timeout_s: float) -> None:
        self._store = store
        self._fleet = fleet
        self._batch: asyncio.Future[dict[str, list[NodeCommand]]] | None = None
        self._replica_id = replicas.id
        self._open: dict[str, Session] = {}
        self._closing: set[Session] = set()  # taken out of _open, their offline state not yet stored
        self.heartbeat_timeout_s = heartbeat_timeout_s  # how long a removed node's session may take to end
        # Subscribed first: a resync re-reads the rows before the sessions look for queued commands.
        self.rows = NodeRows(store, fleet, replicas, self, heartbeat_timeout_s=heartbeat_timeout_s)
        self._bus: ChangeBus = replicas.bus
        self._bus.subscribe(ModelChanged, self._model_changed)
        self._bus.subscribe(CommandsQueued, self._commands_queued)
        self._bus.subscribe(NodeDrained, self._drained)
        self._bus.subscribe(NodeUndrained, self._undrained)
        self._bus.subscribe(NodeRemoved, self._removed)
        self._bus.subscribe(Resync, self._resync)

    async def open(self, node_id: str) -> Session:
        previous = self._open.get(node_id)
        if previous is not None:  # a reconnect beat the old stream's teardown: the newest wins
            previous.stopped = True
            previous.wake.set()
        session = Session(node_id)
        self._open[node_id] = session
        self._fleet.connected(node_id)
        try:
            await self.rows.attach(node_id)
        except BaseException:  # e.g. cancelled as the stream drops: no caller holds the session to close it
            await self.close(session)
            raise
        log.info("node.connected", node_id=node_id, replica_id=self._replica_id)
        return session

    async def close(self, session: Session) -> None:
        if self._open.get(session.node_id) is not session:
            session.closed.set()
            return
        del self._open[session.node_id]
        self._closing.add(session)
        try:
            self._fleet.disconnected(session.node_id)
            write = asyncio.ensure_future(self.rows.detach(session.node_id))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:  # grpc cancels a handler whose stream dropped, often right here
                await write  # record it offline all the same: the other replicas route by the record
                raise
            log.info("node.disconnected", node_id=session.node_id)
        finally:
            self._closing.discard(session)
            session.closed.set()

    async def close_all(self) -> None:
        """Closes every session, and waits for the closes under way, before the store is closed.

        A stream handler that grpc stopped while it waited may only run its own close later, when
        the store is gone; it then finds its session already closed and leaves the store alone.
        """
        for session in list(self._open.values()):
            session.stopped = True  # should its handler wake again, it sends nothing more
            session.wake.set()
            await self.close(session)
        while self._closing:
            await asyncio.wait([asyncio.ensure_future(s.closed.wait()) for s in self._closing])

    def wake_all(self) -> None:
        """Wakes every session, e.g. so each sends its node the fleet tokens after a rotation."""
        for session in self._open.values():
            session.wake.set()

    async def cut(self, node_id: str, timeout_s: float) -> bool:
        """Ends the node's session at once (its key was revoked); False if it had none open."""
        session = self._open.get(node_id)
        if session is None:
            return False
        session.revoked = True
        session.wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(session.closed.wait()), timeout_s)
        except TimeoutError:
            log.warning("node.session_end_timeout", node_id=node_id)
        return True

    def notify_all(self) -> None:
        """Wakes every session so it sends the commands queued for its node."""
        self.notify_many(list(self._open))

    def notify_many(self, node_ids: list[str]) -> None:
        """Wakes the sessions of ``node_ids`` held here; their queues are read in one store read.

        A delete reaches every node at once: a thousand sessions each reading its own queue would
        make a thousand queries where one does.
        """
        self._batch = None  # commands were queued: the next shared read starts afresh
        for node_id in node_ids:
            session = self._open.get(node_id)
            if session is not None:
                session.batched = True
                session.wake.set()

    async def pending(self, session: Session) -> list[NodeCommand]:
        """The commands waiting for the session's node, oldest first."""
        if not session.batched:
            return await self._store.pending_commands(session.node_id)
        session.batched = False
        if self._batch is None:
            self._batch = asyncio.ensure_future(self._store.pending_by_node())
        # Shielded: one session's handler cancelled must not cancel the read the others wait on.
        return (await asyncio.shield(self._batch)).get(session.node_id, [])

    def notify(self, node_id: str) -> None:
        """Wakes the node's session, if it is held here, so it sends the commands queued for it."""
        session = self._open.get(node_id)
        if session is not None:
            session.wake.set()

    def node_ids(self) -> list[str]:
        """The nodes whose sessions this balancer holds."""
        return sorted(self._open)

    def get(self, node_id: str) -> Session | None:
        """The node's open session, if it is connected."""
        return self._open.get(node_id)

    async def end(self, node_id: str, timeout_s: float) -> bool:
        """Ends the node's session once its queued commands are sent; False if it had none open."""
        session = self._open.get(node_id)
        if session is None:
            return False
        session.ending = True
        session.wake.set()
        try:
            await asyncio.wait_for(session.closed.wait(), timeout_s)
        except TimeoutError:  # a stream stuck on a slow reader must not hold up the caller
            log.warning("node.session_end_timeout", node_id=node_id)
        return True

    # -- what other replicas changed ------------------------------------------------------------

    async def _model_changed(self, _: ModelChanged) -> None:
        self.notify_all()  # a delete or pull queued commands for nodes held here

    async def _commands_queued(self, change: CommandsQueued) -> None:
        self.notify(change.node_id) if change.node_id else self.notify_all()

    async def _drained(self, change: NodeDrained) -> None:
        await self._set_draining(change.node_id, True)

    async def _undrained(self, change: NodeUndrained) -> None:
        await self._set_draining(change.node_id, False)

    async def _set_draining(self, node_id: str, draining: bool) -> None:
        session = self._open.get(node_id)
        self._fleet.set_draining(node_id, draining)
        if session is not None:  # held here: a heartbeat saying otherwise must not undo it
            session.draining = draining
            session.wake.set()
            await self.rows.reported(node_id)

    async def _removed(self, change: NodeRemoved) -> None:
        if self._open.get(change.node_id) is not None:
            self._bus.spawn(self._end_removed(change.node_id))
        else:
            self._fleet.remove(change.node_id)

    async def _end_removed(self, node_id: str) -> None:
        await self.end(node_id, self.heartbeat_timeout_s)
        self._fleet.remove(node_id)

    async def _resync(self, _: Resync) -> None:
        # In case a commands notice was lost: the sessions with commands waiting look again.
        self.notify_many(await self._store.nodes_with_commands())
