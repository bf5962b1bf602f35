"""The change bus: what one balancer replica tells the others it changed, and who follows it there.

A writer publishes a typed change once its write is committed (``bus.publish(ModelChanged(id))``);
``balancer.replicas`` carries it to every other replica, where the bus hands it to the handlers the
owners of that state subscribed (``bus.subscribe(ModelChanged, handler)``): the catalogue, the key
ring, the node sessions. A replica's own changes are not handed back to it: the writer has applied
them already. With one balancer (SQLite) nothing is carried.

The replication also hands the subscribers a few events of its own, which never travel: ``Resync``
(re-read everything), ``Rejoined`` (the others had taken this replica for dead) and ``Beat``.

On the wire a change is ``"<sender> <kind> <subject>"``, each kind's subject as it always was (a
node's load: ``"<node id> <active> <queued>"``), so replicas of two versions understand each other
during a rolling restart; a kind or subject this version cannot read is dropped (the resync covers it).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import structlog

log = structlog.get_logger(__name__)


class Change(enum.StrEnum):
    """The kinds of change that travel between replicas, as named on the wire."""

    MODEL = "model"
    KEY = "key"
    COMMANDS = "commands"
    DRAIN = "drain"
    UNDRAIN = "undrain"
    REMOVE = "remove"
    NODE = "node"
    LOAD = "load"


@dataclass(frozen=True, slots=True)
class ModelChanged:
    """A model was registered or deleted."""

    KIND: ClassVar[Change] = Change.MODEL
    model_id: str

    def subject(self) -> str:
        return self.model_id

    @classmethod
    def parse(cls, subject: str) -> ModelChanged:
        return cls(subject)


@dataclass(frozen=True, slots=True)
class KeyChanged:
    """A key was created or revoked (``key`` is its id, or the shown prefix it was revoked by)."""

    KIND: ClassVar[Change] = Change.KEY
    key: str

    def subject(self) -> str:
        return self.key

    @classmethod
    def parse(cls, subject: str) -> KeyChanged:
        return cls(subject)


@dataclass(frozen=True, slots=True)
class CommandsQueued:
    """Commands were queued for a node, or for every node when ``node_id`` is empty."""

    KIND: ClassVar[Change] = Change.COMMANDS
    node_id: str = ""

    def subject(self) -> str:
        return self.node_id

    @classmethod
    def parse(cls, subject: str) -> CommandsQueued:
        return cls(subject)


@dataclass(frozen=True, slots=True)
class NodeDrained:
    """A node was told to drain."""

    KIND: ClassVar[Change] = Change.DRAIN
    node_id: str

    def subject(self) -> str:
        return self.node_id

    @classmethod
    def parse(cls, subject: str) -> NodeDrained:
        return cls(subject)


@dataclass(frozen=True, slots=True)
class NodeUndrained:
    """A node was put back in rotation."""

    KIND: ClassVar[Change] = Change.UNDRAIN
    node_id: str

    def subject(self) -> str:
        return self.node_id

    @classmethod
    def parse(cls, subject: str) -> NodeUndrained:
        return cls(subject)


@dataclass(frozen=True, slots=True)
class NodeRemoved:
    """An operator removed a node: the replica holding its session ends it."""

    KIND: ClassVar[Change] = Change.REMOVE
    node_id: str

    def subject(self) -> str:
        return self.node_id

    @classmethod
    def parse(cls, subject: str) -> NodeRemoved:
        return cls(subject)


@dataclass(frozen=True, slots=True)
class NodeChanged:
    """A node's row changed: its session, its state or what it reports (re-read it)."""

    KIND: ClassVar[Change] = Change.NODE
    node_id: str

    def subject(self) -> str:
        return self.node_id

    @classmethod
    def parse(cls, subject: str) -> NodeChanged:
        return cls(subject)


@dataclass(frozen=True, slots=True)
class NodeLoadChanged:
    """A node's reported load, announced by the replica holding it (not stored: it changes too often)."""

    KIND: ClassVar[Change] = Change.LOAD
    node_id: str
    active: int
    queued: int

    def subject(self) -> str:
        return f"{self.node_id} {self.active} {self.queued}"

    @classmethod
    def parse(cls, subject: str) -> NodeLoadChanged:
        """Raises ``ValueError`` on numbers it cannot read; numbers left out read as 0."""
        node_id, active, queued = [*subject.split(" "), "0", "0"][:3]
        return cls(node_id, int(active), int(queued))


Travelling = (
    ModelChanged
    | KeyChanged
    | CommandsQueued
    | NodeDrained
    | NodeUndrained
    | NodeRemoved
    | NodeChanged
    | NodeLoadChanged
)
_BY_KIND: dict[Change, Callable[[str], Travelling]] = {
    cls.KIND: cls.parse
    for cls in (
        ModelChanged,
        KeyChanged,
        CommandsQueued,
        NodeDrained,
        NodeUndrained,
        NodeRemoved,
        NodeChanged,
        NodeLoadChanged,
    )
}


def decode(kind: str, subject: str) -> Travelling | None:
    """The change a notice names; None for a kind or subject this version cannot read."""
    try:
        return _BY_KIND[Change(kind)](subject)
    except (ValueError, KeyError):  # from a newer replica: the resync covers whatever it meant
        log.debug("replica.unknown_change", kind=kind, subject=subject)
        return None


@dataclass(frozen=True, slots=True)
class Resync:
    """Re-read everything from the store: periodically, and after notices may have been lost."""


@dataclass(frozen=True, slots=True)
class Rejoined:
    """The other replicas had released this one as dead: record again what is held here."""


@dataclass(frozen=True, slots=True)
class Beat:
    """This replica beat its row. ``alive``: the replicas alive now, once it has beaten long enough
    to judge the others (None until then, e.g. just after a database outage)."""

    alive: frozenset[str] | None = None


Local = Resync | Rejoined | Beat
M = TypeVar("M", bound=Travelling | Local)
Carrier = Callable[[Change, str], Awaitable[None]]


class ChangeBus:
    """Where writers publish what they changed, and owners of state subscribe to what others changed.

    Handlers of one kind run in the order they subscribed, one change at a time; a handler that
    would hold up the changes after it (ending a session) runs its slow part with ``spawn``.
    """

    def __init__(self) -> None:
        self._handlers: dict[type[Any], list[Callable[[Any], Awaitable[None]]]] = {}
        self._carrier: Carrier | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def subscribe(self, kind: type[M], handler: Callable[[M], Awaitable[None]]) -> None:
        """Calls ``handler`` with each change of ``kind`` another replica makes (or each local event)."""
        self._handlers.setdefault(kind, []).append(handler)

    def carry_with(self, carrier: Carrier) -> None:
        """What carries published changes to the other replicas (``balancer.replicas``)."""
        self._carrier = carrier

    async def publish(self, change: Travelling) -> None:
        """Tells the other replicas; never raises (a lost change is caught by the periodic resync)."""
        if self._carrier is not None:
            await self._carrier(change.KIND, change.subject())

    async def deliver(self, change: Travelling | Local) -> None:
        """Hands ``change`` to its subscribers, in order; the first error stops it and is raised."""
        for handler in self._handlers.get(type(change), ()):
            await handler(change)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Runs a handler's slow part apart, so the changes after it are not held up; ``close`` ends it."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancels what handlers left running."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
