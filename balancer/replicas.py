"""Replicas: several balancers on one PostgreSQL database, each serving both doors, all routing to
every node.

This module carries the change bus (``balancer.changes``) between replicas and keeps each replica's
row alive; it knows no owner of state. Every change anyone publishes is announced with PostgreSQL's
LISTEN/NOTIFY on one channel; the other replicas hand it to their subscribers, which re-read what the
notice names. Nothing rides on a notice alone: a periodic ``Resync`` re-reads everything, which also
catches the notices lost while a connection was down. Each replica holds the sessions of the nodes
attached to it and records them in the node rows (``balancer.fleet.rows``).

Each replica beats its own row in ``balancer_replicas`` every second. A replica silent past the
heartbeat timeout is taken as dead: any other replica releases it, and the nodes it held are offline
until they attach to a live replica (they do by themselves, see ``node.link``).

With SQLite there is one balancer: nothing is announced or listened to.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time

import asyncpg
import structlog
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from balancer.changes import Beat, Change, ChangeBus, NodeChanged, Rejoined, Resync, Travelling, decode
from balancer.store import Store
from balancer.store.engine import is_postgresql
from common.errors import LlmlbError

log = structlog.get_logger(__name__)

CHANNEL = "llmlb_changes"
BEAT_S = 1.0  # how often a replica beats its row and looks for replicas that stopped beating
RESYNC_S = 5.0  # how often a replica re-reads everything, in case a notice was lost
CONNECT_TIMEOUT_S = 5.0
# What a store or listener call raises when the database cannot be reached or refuses.
STORE_ERRORS = (LlmlbError, SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def new_replica_id() -> str:
    """A name for this process among the replicas: host, pid and a random tail (it never restarts)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


class Replicas:
    """This balancer's part among the replicas of one store: carries its ``bus`` to the others and
    back, and beats its row."""

    def __init__(self, store: Store, *, database_url: str, timeout_s: float) -> None:
        self.id = new_replica_id()
        self.shared = is_postgresql(make_url(database_url))
        self.bus = ChangeBus()
        self.bus.carry_with(self._send)
        self._store = store
        self._url = database_url
        self._timeout_s = timeout_s  # a replica silent this long is dead
        self._conn: asyncpg.Connection | None = None
        self._conn_lock = asyncio.Lock()  # an asyncpg connection runs one query at a time
        self._inbox: asyncio.Queue[Travelling] = asyncio.Queue()
        self._beating_since: float | None = None  # since when beats succeed without a gap
        # Stopping gracefully: the nodes held here stay online for others (``balancer.fleet.rows``).
        self.handing_over = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Records this replica, forgets the ones that are gone, learns every other replica's nodes."""
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
            await self.resync()
            for loop in (self._apply_loop(), self._beat_loop(), self._resync_loop()):
                task = asyncio.create_task(loop)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        log.info("replica.started", replica_id=self.id, shared=self.shared)

    def begin_stop(self) -> None:
        """The balancer stops gracefully: the sessions it closes next are handed over, not ended.

        Those nodes are alive and attach to another replica within a second; marked offline, every
        other replica would stop routing to them meanwhile. So they stay online in the store, held by
        no replica (``stop`` records that), and the others keep routing to them until one of them
        holds the node again, or the heartbeat timeout passes without that.
        """
        self.handing_over = self.shared

    async def stop(self) -> None:
        """Stops following the others and gives up this replica's row (its sessions are closed first)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.close()
        try:
            if self.handing_over:
                for node_id in await self._store.hand_over(self.id):
                    await self.bus.publish(NodeChanged(node_id))
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

    async def resync(self) -> None:
        """Has every subscriber re-read what it follows (the catalogue, the keys, every node)."""
        await self.bus.deliver(Resync())

    # -- what this replica tells the others -----------------------------------------------------

    async def _send(self, kind: Change, subject: str) -> None:
        """Announces a committed change to the other replicas; never raises (the resync catches up)."""
        conn = self._conn
        if not self.shared or conn is None or conn.is_closed():
            return
        try:
            async with self._conn_lock:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{self.id} {kind.value} {subject}")
        except STORE_ERRORS as exc:
            log.warning("replica.publish_failed", kind=kind.value, subject=subject, error=str(exc))

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
        change = decode(kind, subject)
        if change is not None:
            self._inbox.put_nowait(change)

    async def _apply_loop(self) -> None:
        while True:
            change = await self._inbox.get()
            try:
                await self.bus.deliver(change)
            except STORE_ERRORS as exc:  # the store went away: the resync after it returns catches up
                log.warning("replica.apply_failed", change=change.KIND.value, error=str(exc))

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
        if not await self._store.replica_beat(self.id):  # released by the others as dead: hold our own again
            log.warning("replica.rejoined", replica_id=self.id)
            await self.bus.deliver(Rejoined())
        if self._beating_since is None:
            self._beating_since = time.monotonic()
        if self._conn is None or self._conn.is_closed():
            await self._listen()
            log.info("replica.listening_again", replica_id=self.id)
            await self.resync()  # notices sent while the connection was down are lost
        # After an outage nobody could beat: wait a full timeout of our own beats before judging others.
        alive = None
        if time.monotonic() - self._beating_since >= self._timeout_s:
            alive = await self._release_stale()
        await self.bus.deliver(Beat(alive))

    async def _release_stale(self) -> frozenset[str]:
        """Releases every replica silent past the timeout (the nodes they held are offline); the
        replicas alive now."""
        for replica_id in await self._store.stale_replicas(self._timeout_s):
            if replica_id == self.id:
                continue
            released = await self._store.release_replica(replica_id)
            log.warning("replica.gone", replica_id=replica_id, nodes=released)
            for node_id in released:
                await self.bus.publish(NodeChanged(node_id))
        return frozenset(await self._store.replicas())

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_S)
            try:
                await self.resync()
            except STORE_ERRORS as exc:
                log.warning("replica.resync_failed", replica_id=self.id, error=str(exc))
