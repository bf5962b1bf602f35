"""Everything a running balancer is made of, handed to both doors (gRPC servicers and the HTTP shim)."""

from __future__ import annotations

from dataclasses import dataclass, field

from balancer.auth import KeyRing
from balancer.catalog import Catalog
from balancer.fleet import Fleet
from balancer.origin import Origin
from balancer.replicas import Replicas
from balancer.router import Router
from balancer.sessions import NodeSessions
from balancer.store import Store
from common.config import BalancerConfig
from common.metrics import BalancerMetrics


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
    # What every node accepts on its Inference and Manifest port (``balancer.fleet_token``); never shown.
    fleet_token: str = field(default="", repr=False)
