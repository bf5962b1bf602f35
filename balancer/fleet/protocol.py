"""The node-session protocol, transport-neutral: hello, heartbeats, model states, command delivery and acks.

A node opens its session with a hello; from then on it sends heartbeats (its load, every model it holds,
whether it drains), model states between heartbeats, the prompt prefixes each model keeps computed,
and acks for the commands it was sent. The balancer answers the hello, then sends every command queued
for the node, each once per session; a command stays queued in the store until the node acks it, so one
lost with a dropped stream is sent again on the next session. A node silent past the heartbeat timeout
has its session closed.

The gRPC servicer converts its messages to and from the types here and calls ``serve``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace

import structlog

from balancer.fleet import owners
from balancer.fleet.sessions import NodeSessions, Session
from balancer.fleet.token import Grant
from balancer.fleet.view import NodeLoad
from balancer.parts import BalancerParts
from balancer.store import Store, StoreUnavailable
from common.errors import ErrorCode, LlmlbError
from common.types import ApiKey, CommandKind, Model, ModelOnNode, NodeCommand

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Hello:
    """The first message of a session: which node this is."""

    node_id: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The node's full picture; a model it no longer lists is gone from it.

    Each ``ModelOnNode.node_id`` is ignored: a node speaks only for itself, so the session's id is used.
    """

    load: NodeLoad
    models: tuple[ModelOnNode, ...] = ()
    draining: bool = False
    stopping: bool = False  # shutting down (SIGTERM): the drain cannot be undone


@dataclass(frozen=True, slots=True)
class ModelReported:
    """One model's state changed between heartbeats (``status.node_id`` is ignored, as in ``Heartbeat``)."""

    status: ModelOnNode


@dataclass(frozen=True, slots=True)
class PrefixesReported:
    """The prompt prefixes one model keeps computed on the node; replaces that model's previous report."""

    model_id: str
    hashes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class LocalModelsReported:
    """Every model placed by hand on the node (its whole list; see ``Catalog.register_local``).

    Nothing in them is trusted: the catalogue checks every id, file name and source.
    """

    models: tuple[Model, ...] = ()


@dataclass(frozen=True, slots=True)
class CommandAck:
    """The node carried out a command (``ok``) or could not (``error`` says why)."""

    command_id: int
    ok: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class Accepted:
    """The balancer's answer to the hello."""

    node_id: str
    heartbeat_interval_ms: int


@dataclass(frozen=True, slots=True)
class Tokens:
    """The fleet tokens the node holds from now on (sent at the start, at each turn, on a rotation)."""

    grant: Grant


@dataclass(frozen=True, slots=True)
class Unrecognised:
    """A message this balancer does not know (from a newer node): it still shows the node is alive."""

    kind: str = ""


NodeMessage = (
    Hello | Heartbeat | ModelReported | PrefixesReported | LocalModelsReported | CommandAck | Unrecognised
)
BalancerMessage = Accepted | Tokens | NodeCommand

MAX_LOCAL_MODELS = 1000  # models placed by hand one node may report; the rest are not read
_NOT_HELLO = "a node session starts with hello"


async def serve(
    parts: BalancerParts, inbound: AsyncIterator[NodeMessage], caller: ApiKey | None = None
) -> AsyncGenerator[BalancerMessage, None]:
    """Runs one node's session: reads what it sends, yields what the balancer sends it.

    ``caller`` is the key that opened the stream (None with keys off): only the node's owner (or an
    admin key) may speak for it. Raises ``invalid_request`` when the first message (within the
    heartbeat timeout) is not a hello, ``node_not_found`` when the node is not registered or was
    removed while connected, ``forbidden`` when the node belongs to another key, ``unauthorized``
    when its key was revoked while connected, ``unavailable`` when the store cannot be reached to
    look the node up (the node retries). Once open, a session outlives a store outage: command polls
    and acks that fail are retried on a later tick. The fleet tokens follow the first answer and are
    sent again before each turn of their window and at once when a revocation rotates them.
    """
    store, sessions, fleet, config = parts.store, parts.sessions, parts.fleet, parts.config
    tokens = parts.fleet_tokens
    timeout_s = config.heartbeat_timeout_ms / 1000
    try:
        first = await asyncio.wait_for(anext(inbound), timeout_s)
    except (StopAsyncIteration, TimeoutError):
        raise LlmlbError(ErrorCode.INVALID_REQUEST, _NOT_HELLO) from None
    if not isinstance(first, Hello) or not first.node_id:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, _NOT_HELLO)
    node_id = first.node_id
    node = await store.get_node(node_id)
    if node is None:
        raise LlmlbError(ErrorCode.NODE_NOT_FOUND, f"node {node_id!r} is not registered; call RegisterNode")
    owners.check_session(caller, node)  # another key's session would take the node's place
    session = await sessions.open(node_id)
    reader: asyncio.Task[None] | None = None
    # From here on the session closes however the handler ends: grpc cancels it at whatever await it
    # is in when the stream drops, and the fleet already lists the node.
    try:
        # A drain still queued (e.g. from before a balancer restart) holds from the first heartbeat on.
        if any(c.kind is CommandKind.DRAIN for c in await _pending(sessions, session) or ()):
            session.draining = True
            fleet.set_draining(node_id, True)
            await parts.sessions.rows.reported(node_id)
        reader = asyncio.create_task(_read(parts, session, inbound))
        yield Accepted(node_id, config.heartbeat_interval_ms)
        granted = tokens.version, tokens.epoch()
        yield Tokens(tokens.grant(replaces=True))  # the whole set: a rotation may have passed it by
        # The queue is read when the session starts and when something wakes it (commands queued here
        # or, through a notice, on another replica; the periodic resync wakes it too): never on a
        # timer, which with many nodes would cost a store query per node every few seconds.
        read_queue = True
        while not session.stopped and not session.revoked:
            session.wake.clear()  # cleared before reading the queue, so no command slips between
            if (tokens.version, tokens.epoch()) != granted:  # a new window, or a rotation
                rotated = tokens.version != granted[0]
                granted = tokens.version, tokens.epoch()
                yield Tokens(tokens.grant(replaces=rotated))
            pending: list[NodeCommand] | None = []
            if read_queue:
                pending = await _pending(sessions, session)
                for cmd in pending or ():
                    if cmd.id not in session.sent:
                        session.sent.add(cmd.id)
                        yield cmd
            if session.ending or session.revoked:
                break
            silent_for = time.monotonic() - session.last_seen
            if silent_for > timeout_s:
                log.warning("node.silent", node_id=node_id, seconds=round(silent_for, 1))
                break
            wait_s = min(timeout_s - silent_for, tokens.seconds_to_next())
            if pending is None:  # the store did not answer: ask again on the next heartbeat's tick
                wait_s = min(wait_s, config.heartbeat_interval_ms / 1000)
            waker = asyncio.ensure_future(session.wake.wait())
            try:
                await asyncio.wait({waker, reader}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when cancelled: a waker left pending outlives the session
                waker.cancel()
            if reader.done():
                break
            read_queue = pending is None or session.wake.is_set()
    finally:
        if reader is not None:
            reader.cancel()
        await sessions.close(session)
    if session.revoked:  # the node's link sees why its session ended, and cannot register again
        raise LlmlbError(ErrorCode.UNAUTHORIZED, f"the key node {node_id!r} registered with was revoked")
    if session.ending:
        raise LlmlbError(ErrorCode.NODE_NOT_FOUND, f"node {node_id!r} was removed from the balancer")


async def _read(parts: BalancerParts, session: Session, inbound: AsyncIterator[NodeMessage]) -> None:
    fleet, node_id = parts.fleet, session.node_id
    async for msg in inbound:
        session.heard()
        if isinstance(msg, Heartbeat):
            fleet.set_load(node_id, msg.load)
            fleet.replace(node_id, [replace(m, node_id=node_id) for m in msg.models])
            fleet.set_stopping(node_id, msg.stopping)
            fleet.set_draining(node_id, msg.draining or session.draining)
            await parts.sessions.rows.reported(node_id)
        elif isinstance(msg, ModelReported):
            fleet.report(replace(msg.status, node_id=node_id))
            await parts.sessions.rows.reported(node_id)
        elif isinstance(msg, PrefixesReported):
            fleet.set_prefixes(node_id, msg.model_id, msg.hashes)
            await parts.sessions.rows.reported(node_id)
        elif isinstance(msg, LocalModelsReported):
            await parts.catalog.register_local(node_id, msg.models)
        # Only commands sent to this node on this session can be cleared by it.
        elif isinstance(msg, CommandAck) and msg.command_id in session.sent:
            if msg.ok:
                await _ack(parts.store, session, msg.command_id)
            else:
                log.warning(
                    "node.command_failed", node_id=node_id, command_id=msg.command_id, error=msg.error
                )


async def _pending(sessions: NodeSessions, session: Session) -> list[NodeCommand] | None:
    """The node's queued commands; None while the store cannot be reached (the session stays up)."""
    try:
        return await sessions.pending(session)
    except StoreUnavailable:
        log.warning("node.commands_unread", node_id=session.node_id)
        return None


async def _ack(store: Store, session: Session, command_id: int) -> None:
    """Clears an acknowledged command; while the store cannot be reached the command stays queued
    and is sent again once it answers, so the node carries it out (harmlessly) and acks it anew."""
    try:
        await store.ack_command(command_id)
    except StoreUnavailable:
        log.warning("node.ack_unstored", node_id=session.node_id, command_id=command_id)
        session.sent.discard(command_id)
