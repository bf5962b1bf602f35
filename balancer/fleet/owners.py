"""Who may speak for a node id: the rules, and cutting a node off when the key it registered with goes.

A node id belongs to the key that first registered it (``Node.owner_key_id``). Only that key opens the
node's session or registers the id again; an ``admin`` key, or a node key an admin bound to that id
(``llmlb keys create --scope node --node-id N``), re-assigns it. A key bound to a node id registers
that id only. While the node is online its address changes only through its own session: another
registration with a different address is refused, whoever asks, so its traffic (prompts included)
cannot be diverted. With keys off there is no owner and only the address rule holds.

When a key that could hold the fleet token (``node`` or ``admin`` scope) is revoked, the fleet token
is rotated (``balancer.fleet.token``) and the sessions of the nodes the key owns end, on every
replica: the change bus's ``KeyChanged`` makes each replica look (``Revocations``).
"""

from __future__ import annotations

import structlog

from balancer.changes import ChangeBus, KeyChanged, Resync
from balancer.fleet.sessions import NodeSessions
from balancer.fleet.token import FleetTokens
from balancer.store import Store, StoreUnavailable
from common.errors import ErrorCode, LlmlbError
from common.types import ApiKey, Node, Scope

log = structlog.get_logger(__name__)


def requested_id(key: ApiKey | None, node_id: str) -> str:
    """The id a registration asks for: a bound key's own when it names none; refused when it names another."""
    if key is None or not key.node_id:
        return node_id
    if node_id and node_id != key.node_id:
        raise LlmlbError(
            ErrorCode.FORBIDDEN, f"this key is bound to node {key.node_id!r} and may not register {node_id!r}"
        )
    return key.node_id


def owner_after_registration(key: ApiKey | None, stored: Node | None, address: str, online: bool) -> str:
    """The key id the node id belongs to once ``key`` registers it at ``address``; ``forbidden`` when
    the id belongs to another key, or the node is online at another address.

    ``stored`` is the node as recorded (None: a new id); ``online`` whether a replica holds its session.
    """
    if stored is not None and online and stored.address != address:
        raise LlmlbError(
            ErrorCode.FORBIDDEN,
            f"node {stored.id!r} is online at another address; it changes only through its own session",
        )
    if key is None:  # keys off: nobody owns anything
        return stored.owner_key_id if stored is not None else ""
    if stored is None or not stored.owner_key_id or stored.owner_key_id == key.id:
        return key.id
    if Scope.ADMIN in key.scopes or key.node_id == stored.id:  # an admin's explicit re-assignment
        log.info("node.reassigned", node_id=stored.id, previous_key_id=stored.owner_key_id, key_id=key.id)
        return key.id
    raise LlmlbError(ErrorCode.FORBIDDEN, f"node {stored.id!r} belongs to another key")


def check_session(key: ApiKey | None, node: Node) -> None:
    """``forbidden`` unless ``key`` may open ``node``'s session (its owner, or an admin key)."""
    if key is None or key.id == node.owner_key_id or Scope.ADMIN in key.scopes:
        return
    raise LlmlbError(ErrorCode.FORBIDDEN, f"node {node.id!r} belongs to another key")


def may_hold_fleet_token(key: ApiKey) -> bool:
    """Whether ``key`` could have fetched the fleet token (so revoking it must rotate the token)."""
    return Scope.NODE in key.scopes or Scope.ADMIN in key.scopes


class Revocations:
    """Cuts a node off when the key it registered with is revoked, here or on another replica."""

    def __init__(
        self, tokens: FleetTokens, sessions: NodeSessions, store: Store, bus: ChangeBus, *, timeout_s: float
    ) -> None:
        self._tokens = tokens
        self._sessions = sessions
        self._store = store
        self._bus = bus
        self._timeout_s = timeout_s  # how long a cut session may take to end
        bus.subscribe(KeyChanged, self._key_changed)
        bus.subscribe(Resync, self._resync)

    async def revoked(self, key: ApiKey) -> None:
        """``key`` was revoked here: rotate the fleet token if it could hold one, end its nodes' sessions."""
        if may_hold_fleet_token(key):
            await self._tokens.rotate()
            log.info("fleet_token.rotated", key_id=key.id)
            self._sessions.wake_all()  # each session sends its node the new tokens, old ones withdrawn
        await self._end_sessions({key.id})

    async def follow(self) -> None:
        """A key changed on another replica: take up a rotated fleet token, end revoked owners' sessions."""
        try:
            if await self._tokens.reload():
                self._sessions.wake_all()
            gone = {k.id for k in await self._store.list_keys() if k.revoked_at is not None}
            await self._end_sessions(gone)
        except StoreUnavailable:  # the resync after the store returns looks again
            log.warning("node.revocations_unread")

    async def _key_changed(self, _: KeyChanged) -> None:
        self._bus.spawn(self.follow())  # ending sessions must not hold up the changes after this one

    async def _resync(self, _: Resync) -> None:
        await self.follow()

    async def _end_sessions(self, key_ids: set[str]) -> None:
        held = set(self._sessions.node_ids())
        if not held or not key_ids:
            return
        for node in await self._store.list_nodes():  # one read, however many sessions are held here
            if node.id in held and node.owner_key_id in key_ids:
                log.warning("node.key_revoked", node_id=node.id, key_id=node.owner_key_id)
                await self._sessions.cut(node.id, self._timeout_s)
