"""Node operations: register a node, pull a model onto nodes, drain and undrain a node, remove a node.

Transport-neutral: the gRPC ``Registry`` servicer converts its messages to and from these plain types.
Commands for nodes are durable: they wait in the store until the node acknowledges them, so a node
that is offline gets them when it reconnects.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import structlog

from balancer.changes import CommandsQueued, NodeDrained, NodeRemoved, NodeUndrained
from balancer.fleet import owners
from balancer.fleet.sessions import NodeSessions
from balancer.fleet.view import Fleet, NodeInfo
from balancer.parts import BalancerParts
from balancer.store import Store, TooLong
from common.errors import ErrorCode, LlmlbError
from common.node_id import check_node_id
from common.types import ApiKey, Backend, Capability, CommandKind, FileFormat, GpuDevice, Node, NodeState

log = structlog.get_logger(__name__)
DETACH_POLL_S = 0.05  # how often a removal looks whether another replica has let go of the node


@dataclass(frozen=True, slots=True)
class NodeRegistration:
    """What a node says about itself when it registers; an empty ``node_id`` asks the balancer for one."""

    node_id: str
    address: str
    backends: tuple[Backend, ...] = ()
    gpus: tuple[GpuDevice, ...] = ()
    runtimes: tuple[str, ...] = ()
    version: str = ""
    capabilities: frozenset[Capability] = frozenset()
    auth_token: str = field(default="", repr=False)  # what calls to the node present; kept in memory only
    labels: Mapping[str, str] = field(
        default_factory=dict
    )  # ``xllm serve --label``: deployments select by them
    memory_total_mb: int = 0  # the host's RAM, or the node's memory budget where the operator caps it
    formats: frozenset[FileFormat] = frozenset()  # weight formats its runtimes load; empty: by runtimes


@dataclass(frozen=True, slots=True)
class RegisteredNode:
    """The balancer's answer to a registration: the node's id and how often it must be heard from."""

    node: Node
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int


@dataclass(frozen=True, slots=True)
class PulledModel:
    """A pull: the model and the nodes told to fetch it."""

    model_id: str
    node_ids: tuple[str, ...]


async def register_node(
    parts: BalancerParts, reg: NodeRegistration, key: ApiKey | None = None
) -> RegisteredNode:
    """Records the node (offline until its session opens) and what it can serve.

    ``key`` is the caller's (None with keys off): the id must be its to register
    (``balancer.fleet.owners``), and a node online at another address keeps it.
    """
    if not reg.address:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, "address (host:port of the node) is required")
    node_id = check_node_id(owners.requested_id(key, reg.node_id) or f"node-{uuid.uuid4().hex[:12]}")
    fleet = parts.fleet
    new = Node(
        id=node_id,
        address=reg.address,
        backends=list(reg.backends),
        gpus=list(reg.gpus),
        runtimes=list(reg.runtimes),
        version=reg.version,
        state=NodeState.OFFLINE,  # online once its session opens
        last_seen_at=datetime.now(UTC),
    )

    def claim(stored: Node | None) -> Node:  # run in the store's write, so two callers cannot both pass
        online = stored is not None and (bool(stored.replica_id) or fleet.is_online(stored.id))
        return replace(new, owner_key_id=owners.owner_after_registration(key, stored, reg.address, online))

    try:
        node = await parts.store.upsert_node(new, claim)
    except TooLong as exc:  # an address or version longer than the store keeps
        raise LlmlbError(ErrorCode.INVALID_REQUEST, f"node registration: {exc}") from None
    # Routed calls present the node's own token if it has one, else the fleet's (memory only).
    fleet.registered(
        NodeInfo(
            node.id,
            node.address,
            reg.capabilities,
            auth_token=reg.auth_token,
            labels=dict(reg.labels),
            backends=reg.backends,
            runtimes=reg.runtimes,
            gpus=reg.gpus,
            memory_total_mb=reg.memory_total_mb,
            formats=reg.formats,
        )
    )
    config = parts.config
    return RegisteredNode(node, config.heartbeat_interval_ms, config.heartbeat_timeout_ms)


async def known_node(store: Store, node_id: str) -> Node:
    """The registered node ``node_id``; ``node_not_found`` otherwise."""
    node = await store.get_node(node_id) if node_id else None
    if node is None:
        raise LlmlbError(ErrorCode.NODE_NOT_FOUND, f"no node {node_id!r}")
    return node


async def queue_command(store: Store, node_id: str, kind: CommandKind, model_id: str = "") -> None:
    """Queues a durable command unless the same one is still waiting for the node."""
    try:
        pending = await store.pending_commands(node_id)
        if not any(c.kind is kind and c.model_id == model_id for c in pending):
            await store.add_command(node_id, kind, model_id)
    except KeyError:  # removed between the lookup and the insert
        raise LlmlbError(ErrorCode.NODE_NOT_FOUND, f"no node {node_id!r}") from None


async def pull_model(parts: BalancerParts, model_id: str, node_ids: list[str]) -> PulledModel:
    """Tells ``node_ids`` (empty: every online node able to serve the model) to fetch and load it.

    Every id is checked before anything is queued, so an unknown id queues nothing.
    """
    model = await parts.catalog.get(model_id)
    fleet = parts.fleet
    if node_ids:
        targets = list(dict.fromkeys(node_ids))
        for node_id in targets:
            await known_node(parts.store, node_id)
    else:
        wanted = frozenset(model.capabilities)
        targets = [
            node_id
            for node_id in fleet.online()
            if (info := fleet.info(node_id)) is not None and info.capabilities & wanted
        ]
    for node_id in targets:
        await queue_command(parts.store, node_id, CommandKind.PREFETCH, model.id)
    parts.sessions.notify_all()
    await parts.replicas.bus.publish(CommandsQueued())  # nodes held by other replicas
    log.info("model.pull_requested", model_id=model.id, node_ids=targets)
    return PulledModel(model.id, tuple(targets))


def _mark_draining(fleet: Fleet, sessions: NodeSessions, node_id: str) -> bool:
    """Takes the node out of rotation now; True when it is connected."""
    fleet.set_draining(node_id, True)
    session = sessions.get(node_id)
    if session is not None:  # a heartbeat saying otherwise must not undo the drain
        session.draining = True
    return session is not None


async def drain_node(parts: BalancerParts, node_id: str) -> Node:
    """Tells the node to finish its work and take none; it leaves rotation at once. The node, draining."""
    node = await known_node(parts.store, node_id)
    await parts.store.cancel_commands(node.id, CommandKind.UNDRAIN)  # the last word wins
    await queue_command(parts.store, node.id, CommandKind.DRAIN)
    online = _mark_draining(parts.fleet, parts.sessions, node.id)
    parts.sessions.notify_all()
    await parts.replicas.bus.publish(NodeDrained(node.id))
    log.info("node.drain_requested", node_id=node.id, online=online)
    return replace(node, state=NodeState.DRAINING)


async def undrain_node(parts: BalancerParts, node_id: str) -> Node:
    """Puts a drained node back in rotation: a drain still queued is dropped and the node is told to take
    new work again (durable, like a drain). ``node_stopping`` when the node drains because it is shutting
    down: that drain ends with the process. The node, in its state now."""
    node = await known_node(parts.store, node_id)
    if parts.fleet.is_stopping(node.id):  # told by the node itself, on whichever replica holds it
        raise LlmlbError(
            ErrorCode.NODE_STOPPING,
            f"node {node.id!r} is shutting down, so its drain cannot be undone; it takes work again once"
            " it is restarted",
        )
    await parts.store.cancel_commands(node.id, CommandKind.DRAIN)
    await queue_command(parts.store, node.id, CommandKind.UNDRAIN)
    parts.fleet.set_draining(node.id, False)
    session = parts.sessions.get(node.id)
    if session is not None:
        session.draining = False
    parts.sessions.notify_all()
    await parts.replicas.bus.publish(NodeUndrained(node.id))
    online = parts.fleet.is_online(node.id)
    log.info("node.undrain_requested", node_id=node.id, online=online)
    return replace(node, state=NodeState.ONLINE if online else NodeState.OFFLINE)


async def remove_node(parts: BalancerParts, node_id: str) -> str:
    """Forgets the node; a connected one is told to drain first and its session ends. Its id."""
    node = await known_node(parts.store, node_id)
    timeout_s = parts.config.heartbeat_timeout_ms / 1000
    connected = parts.sessions.get(node.id) is not None
    elsewhere = not connected and parts.fleet.remote_replica(node.id) is not None
    if connected or elsewhere:  # told to drain first, so it takes no new work while it is gone
        await queue_command(parts.store, node.id, CommandKind.DRAIN)
        _mark_draining(parts.fleet, parts.sessions, node.id)
    if connected:
        await parts.sessions.end(node.id, timeout_s)
    await parts.replicas.bus.publish(NodeRemoved(node.id))  # the replica holding it ends its session
    if elsewhere:
        await _until_detached(parts.store, node.id, timeout_s)
    await parts.store.remove_node(node.id)
    parts.fleet.remove(node.id)
    log.info("node.removed", node_id=node.id, was_connected=connected or elsewhere)
    return node.id


async def _until_detached(store: Store, node_id: str, timeout_s: float) -> None:
    """Waits (at most ``timeout_s``) for the replica holding the node's session to end it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        node = await store.get_node(node_id)
        if node is None or not node.replica_id:
            return
        await asyncio.sleep(DETACH_POLL_S)
    log.warning("node.session_end_timeout", node_id=node_id, replica_id="other")
