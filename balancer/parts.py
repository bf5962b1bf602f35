"""Everything a running balancer is made of, handed to both doors (gRPC servicers and the HTTP shim)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from balancer.auth import KeyRing
from balancer.catalog import Catalog
from balancer.edge.access_log import AccessLog
from balancer.edge.labels import Labels
from balancer.edge.limits import KeyLimiter
from balancer.edge.observe import Sink
from balancer.edge.plane import InferencePlane
from balancer.fleet.sessions import NodeSessions
from balancer.fleet.token import FleetTokens
from balancer.fleet.view import Fleet
from balancer.history import History
from balancer.origin import Origin
from balancer.replicas import Replicas
from balancer.router import Router
from balancer.store import Store
from balancer.usage import UsageCounter
from common.config import BalancerConfig
from common.metrics import BalancerMetrics

if TYPE_CHECKING:
    from balancer.scheduler.loop import SchedulerLoop


@dataclass(slots=True)
class BalancerParts:
    config: BalancerConfig
    store: Store
    origin: Origin
    catalog: Catalog
    fleet: Fleet
    sessions: NodeSessions
    router: Router
    keys: KeyRing
    metrics: BalancerMetrics
    replicas: Replicas  # this balancer among the replicas of its store (alone on SQLite)
    # What every node accepts on its Inference and Manifest port (``balancer.fleet.token``); never shown.
    fleet_tokens: FleetTokens = field(repr=False)
    # Counted at the edge when each request ends: usage per key (flushed to the store in batches)
    # and the console's short history of request metrics (memory only, this replica's own).
    usage: UsageCounter = field(init=False)
    history: History = field(init=False)
    # Per-key limits and budgets, applied at the edge for both doors (``balancer.edge.limits``).
    limits: KeyLimiter = field(init=False)
    # The names metrics and the history may use as labels: catalogue models and registered nodes.
    labels: Labels = field(init=False)
    # The one path of every inference request, both doors: admission, limits, metrics and sinks, router.
    plane: InferencePlane = field(init=False)

    @property
    def sinks(self) -> tuple[Sink, ...]:
        """What the inference plane tells of each finished request: usage, history, the access log."""
        access = (AccessLog(),) if self.config.access_log else ()
        return (self.usage, self.history, *access)

    @property
    def fleet_token(self) -> str:
        """The fleet token to present now."""
        return self.fleet_tokens.current()

    # Places deployments' copies (``balancer.scheduler.loop``); None until the server starts it.
    scheduler: SchedulerLoop | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.usage = UsageCounter(self.store, flush_s=self.config.usage_flush_s)
        self.limits = KeyLimiter(self.usage, sync_s=self.config.key_limits_sync_s)
        self.labels = Labels(self.catalog, self.fleet)
        self.history = History(queue_depth=lambda: self.router.waiting, known=self.labels.known)
        self.plane = InferencePlane(self.router, self.metrics, self.labels, self.sinks, self.limits)
