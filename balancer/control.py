"""Management operations both doors share: deleting a model and the fleet-aware views of models and nodes.

Transport-neutral: the gRPC servicers and the HTTP shim convert these plain views to their own wire form.
"""

from __future__ import annotations

from dataclasses import dataclass

from balancer.edge.caller import caller
from balancer.fleet.view import Fleet, ModelStatusView, NodeLoad
from balancer.parts import BalancerParts
from common.errors import ErrorCode, LlmlbError
from common.model_id import normalize_model_id
from common.types import Model, ModelOnNode, ModelState, Node, NodeState


@dataclass(frozen=True, slots=True)
class NodeReadiness:
    """Whether one node that knows a model can serve it now."""

    status: ModelOnNode  # the model's state on that node, as the node reported it
    ready: bool  # loaded there, and the node in rotation: an offline or draining node is not ready

    @property
    def node_id(self) -> str:
        return self.status.node_id

    @property
    def state(self) -> ModelState:
        return self.status.state


@dataclass(frozen=True, slots=True)
class ModelView:
    """A catalogue model with the fleet's answer to "can it be served now, and where"."""

    model: Model
    ready: bool
    nodes: tuple[NodeReadiness, ...]


@dataclass(frozen=True, slots=True)
class NodeView:
    """A registered node with its live state: connection, load and what it holds."""

    node: Node
    state: NodeState
    load: NodeLoad | None
    models: tuple[ModelOnNode, ...]
    replica: str = ""  # the balancer replica holding its session; empty while it has none


@dataclass(frozen=True, slots=True)
class DeletedModel:
    model_id: str
    nodes_notified: int


def in_rotation(fleet: Fleet, node_id: str) -> bool:
    """True when a node is connected and not draining: requests may be sent to it."""
    return fleet.is_online(node_id) and not fleet.is_draining(node_id)


def model_view(fleet: Fleet, model: Model) -> ModelView:
    """``model`` with per-node readiness; it is ready when any node in rotation has it loaded.

    The one rule for ``ready`` in every model listing: both doors and the CLI show what this says.
    """
    nodes = tuple(
        NodeReadiness(n, n.ready and in_rotation(fleet, n.node_id)) for n in fleet.model_nodes(model.id)
    )
    return ModelView(model, any(n.ready for n in nodes), nodes)


async def list_models(parts: BalancerParts) -> list[ModelView]:
    """Every catalogue model with its readiness, by id; for a key with a model list, those only."""
    allowed = _allowed_models()
    return [
        model_view(parts.fleet, m)
        for m in await parts.catalog.list_models()
        if not allowed or m.id in allowed
    ]


async def get_model(parts: BalancerParts, model_id: str) -> ModelView:
    """One model with its readiness; ``invalid_model_id`` or ``model_not_found`` otherwise (also for
    a model outside the calling key's list, worded alike: the key does not learn it exists)."""
    allowed = _allowed_models()
    if allowed and normalize_model_id(model_id) not in allowed:
        raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {normalize_model_id(model_id)!r} not found")
    return model_view(parts.fleet, await parts.catalog.get(model_id))


def _allowed_models() -> tuple[str, ...]:
    key = caller()
    return key.limits.models if key is not None else ()


async def model_status(parts: BalancerParts, model_id: str) -> ModelStatusView:
    """Fleet-wide download / load state of one model."""
    return parts.fleet.status(await parts.catalog.get(model_id))


async def delete_model(parts: BalancerParts, model_id: str) -> DeletedModel:
    """Drops a model and tells every node to delete its copy (durably: offline nodes on reconnect)."""
    notified = await parts.catalog.delete(model_id)
    normal = normalize_model_id(model_id)
    parts.fleet.forget_model(normal)
    parts.sessions.notify_all()  # online nodes get the delete now, offline ones when they reconnect
    return DeletedModel(normal, notified)


def node_state(fleet: Fleet, node_id: str) -> NodeState:
    """Offline unless connected; a connected node is draining or online."""
    if not fleet.is_online(node_id):
        return NodeState.OFFLINE
    return NodeState.DRAINING if fleet.is_draining(node_id) else NodeState.ONLINE


async def list_nodes(parts: BalancerParts) -> list[NodeView]:
    """Every registered node, online or not, with its live state from the fleet."""
    fleet = parts.fleet
    return [
        NodeView(
            node,
            node_state(fleet, node.id),
            fleet.load(node.id),
            tuple(fleet.node_models(node.id)),
            holding_replica(parts, node.id),
        )
        for node in await parts.store.list_nodes()
    ]


def holding_replica(parts: BalancerParts, node_id: str) -> str:
    """The replica holding the node's session: this one, another one, or none ("") while offline."""
    if parts.sessions.get(node_id) is not None:
        return parts.replicas.id
    return parts.fleet.remote_replica(node_id) or ""
