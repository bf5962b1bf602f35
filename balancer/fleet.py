"""The balancer's live view of the fleet: which nodes are connected and what each reports per model.

Durable facts (a node's registration, queued commands) live in the store; this is the in-memory
picture the node sessions keep up to date and the router reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.types import Model


@dataclass(slots=True)
class ModelOnNode:
    """One model's state on one node, as the node last reported it."""

    node_id: str
    model_id: str
    state: str = "absent"  # absent | downloading | present | loading | ready | failed
    downloaded_bytes: int = 0
    total_bytes: int = 0
    error: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "ready"


# Order of how far along a model is, for "the most advanced state on any node".
STATE_RANK = {"absent": 0, "failed": 1, "downloading": 2, "present": 3, "loading": 4, "ready": 5}


@dataclass(slots=True)
class ModelStatusView:
    model_id: str
    status: str
    progress: float
    downloaded_bytes: int
    total_bytes: int
    nodes: list[ModelOnNode] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """How busy a node said it was in its last heartbeat."""

    active_requests: int = 0
    queued_requests: int = 0
    cpu_percent: float = 0.0
    memory_used_mb: int = 0
    memory_total_mb: int = 0


class Fleet:
    """Connected nodes, their per-model states and their last reported load."""

    def __init__(self) -> None:
        self._online: set[str] = set()
        self._models: dict[str, dict[str, ModelOnNode]] = {}  # node_id -> model_id -> state
        self._load: dict[str, NodeLoad] = {}

    def set_load(self, node_id: str, load: NodeLoad) -> None:
        self._load[node_id] = load

    def load(self, node_id: str) -> NodeLoad | None:
        return self._load.get(node_id)

    def node_models(self, node_id: str) -> list[ModelOnNode]:
        return [self._models.get(node_id, {})[k] for k in sorted(self._models.get(node_id, {}))]

    def connected(self, node_id: str) -> None:
        self._online.add(node_id)

    def disconnected(self, node_id: str) -> None:
        self._online.discard(node_id)

    def is_online(self, node_id: str) -> bool:
        return node_id in self._online

    def report(self, status: ModelOnNode) -> None:
        self._models.setdefault(status.node_id, {})[status.model_id] = status

    def replace(self, node_id: str, statuses: list[ModelOnNode]) -> None:
        """The node's full picture from a heartbeat: what it no longer reports is gone."""
        self._models[node_id] = {s.model_id: s for s in statuses}

    def forget_model(self, model_id: str) -> None:
        for per_node in self._models.values():
            per_node.pop(model_id, None)

    def model_nodes(self, model_id: str) -> list[ModelOnNode]:
        return sorted(
            (m[model_id] for m in self._models.values() if model_id in m),
            key=lambda s: s.node_id,
        )

    def status(self, model: Model) -> ModelStatusView:
        """Fleet-wide state of ``model``: the furthest-along online node decides."""
        nodes = self.model_nodes(model.id)
        online = [n for n in nodes if n.node_id in self._online]
        best = max(online, key=lambda n: (STATE_RANK.get(n.state, 0), n.downloaded_bytes), default=None)
        total = model.total_bytes
        if best is None:
            return ModelStatusView(model.id, "absent", 0.0, 0, total, nodes)
        done = total if STATE_RANK.get(best.state, 0) >= STATE_RANK["present"] else best.downloaded_bytes
        progress = (
            min(1.0, done / total)
            if total
            else (1.0 if best.state in ("present", "loading", "ready") else 0.0)
        )
        return ModelStatusView(model.id, best.state, progress, done, total, nodes)
