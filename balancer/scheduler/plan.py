"""What a reconcile pass decides: the actions to carry out, the autoscaling changes, the shortfalls,
and the decisions kept for operators."""

from __future__ import annotations

from dataclasses import dataclass

from balancer.scheduler.autoscaler import Scale
from balancer.scheduler.explain import NodeVerdict
from balancer.scheduler.facts import DeviceKind
from balancer.scheduler.scorers import Estimate


@dataclass(frozen=True, slots=True)
class Place:
    """Put a copy of ``model_id`` on ``node_id``'s device; the node keeps it loaded (pinned)."""

    model_id: str
    node_id: str
    device: int
    device_kind: DeviceKind
    need_mb: int
    estimate: Estimate
    reason: str


@dataclass(frozen=True, slots=True)
class Remove:
    """Stop a copy: the node unloads it and keeps its files. ``unload`` is False when the node
    cannot be told (gone or offline): the copy is only forgotten."""

    model_id: str
    node_id: str
    reason: str
    unload: bool = True


@dataclass(frozen=True, slots=True)
class Shortfall:
    """A deployment with fewer active copies than its target after this pass, and why."""

    model_id: str
    wanted: int
    active: int
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Place | Remove, ...] = ()
    scaling: tuple[Scale, ...] = ()
    shortfalls: tuple[Shortfall, ...] = ()

    @property
    def places(self) -> list[Place]:
        return [a for a in self.actions if isinstance(a, Place)]

    @property
    def removals(self) -> list[Remove]:
        return [a for a in self.actions if isinstance(a, Remove)]


@dataclass(slots=True)
class Decision:
    """A recent decision for operators; a placement gets ``outcome`` and ``actual_s`` once known.

    A placement keeps its ``estimate`` (whence its files, the backend, the bytes, the load estimate),
    and once ready says in ``learned`` what its actual time taught the rates ("" when nothing).
    """

    at: float
    model_id: str
    node_id: str
    text: str
    estimate_s: float | None = None
    outcome: str = ""  # "ready" or "failed"
    actual_s: float | None = None
    estimate: Estimate | None = None
    learned: str = ""


@dataclass(frozen=True, slots=True)
class Explanation:
    """Where the next copy of a model would go and why not elsewhere, and its recent decisions."""

    model_id: str
    target: int
    active: int
    nodes: tuple[NodeVerdict, ...]
    decisions: tuple[Decision, ...]
