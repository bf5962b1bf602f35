"""What one balancer replica tells the others it changed, so their in-memory copies follow the store.

Writers publish a ``Change`` after their write is committed; ``balancer.replicas`` carries it to every
other replica through the database, where each re-reads what changed. With one balancer (SQLite)
nothing is published: ``NO_CHANGES`` takes the calls.
"""

from __future__ import annotations

import enum
from typing import Protocol


class Change(enum.StrEnum):
    MODEL = "model"  # subject: model id, registered or deleted
    KEY = "key"  # subject: key id, created or revoked
    COMMANDS = "commands"  # subject: node id, or empty for every node: commands were queued
    DRAIN = "drain"  # subject: node id, told to drain
    UNDRAIN = "undrain"  # subject: node id, put back in rotation
    REMOVE = "remove"  # subject: node id, removed by an operator
    NODE = "node"  # subject: node id: its session, state or what it reports changed
    LOAD = "load"  # subject: "<node id> <active> <queued>", a node's reported load (not stored)


class Changes(Protocol):
    """Where writers publish what they changed."""

    async def publish(self, kind: Change, subject: str = "") -> None:
        """Tells the other replicas; never raises (a lost change is caught by the periodic resync)."""
        ...


class _NoChanges:
    async def publish(self, kind: Change, subject: str = "") -> None:
        del kind, subject


NO_CHANGES: Changes = _NoChanges()
