"""Open node sessions: who is connected, when each was last heard, and how to wake its sender.

A node is in rotation exactly while its session is open; the session ends when the stream drops or
the node stays silent past the heartbeat timeout.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from balancer.fleet import Fleet
from balancer.store import Store
from common.types import NodeState

log = structlog.get_logger(__name__)


@dataclass(eq=False, slots=True)
class Session:
    node_id: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_seen: float = field(default_factory=time.monotonic)
    sent: set[int] = field(default_factory=set)  # command ids delivered on this session
    superseded: bool = False

    def heard(self) -> None:
        self.last_seen = time.monotonic()


class NodeSessions:
    def __init__(self, store: Store, fleet: Fleet) -> None:
        self._store = store
        self._fleet = fleet
        self._open: dict[str, Session] = {}

    async def open(self, node_id: str) -> Session:
        previous = self._open.get(node_id)
        if previous is not None:  # a reconnect beat the old stream's teardown: the newest wins
            previous.superseded = True
            previous.wake.set()
        session = Session(node_id)
        self._open[node_id] = session
        self._fleet.connected(node_id)
        await self._store.set_node_state(node_id, NodeState.ONLINE, seen_at=datetime.now(UTC))
        log.info("node.connected", node_id=node_id)
        return session

    async def close(self, session: Session) -> None:
        if self._open.get(session.node_id) is not session:
            return
        del self._open[session.node_id]
        self._fleet.disconnected(session.node_id)
        await self._store.set_node_state(session.node_id, NodeState.OFFLINE, seen_at=datetime.now(UTC))
        log.info("node.disconnected", node_id=session.node_id)

    def notify_all(self) -> None:
        """Wakes every session so it sends the commands queued for its node."""
        for session in self._open.values():
            session.wake.set()
