"""The fleet scheduler's core: operators say what should run (deployments), it decides where.

Pure logic, no I/O: filters (``filters/``, one rule a module) exclude nodes, scorers (``scorers/``)
rank the rest by when a copy would be ready, spread and load (``ranking``), and the ``reconciler``
plans each pass from the fleet's facts (``facts``), the measured rates (``rates``) and the demand,
autoscaling min/max deployments (``autoscaler``) and explaining itself (``explain``).
"""

from __future__ import annotations

from balancer.scheduler.autoscaler import Autoscaler, Scale
from balancer.scheduler.deployment import Deployment
from balancer.scheduler.explain import NodeVerdict
from balancer.scheduler.facts import (
    Copy,
    CopyState,
    Demand,
    DeviceFacts,
    DeviceKind,
    Download,
    ModelNeed,
    NodeFacts,
)
from balancer.scheduler.plan import Decision, Explanation, Place, Plan, Remove, Shortfall
from balancer.scheduler.rates import Rates, Source
from balancer.scheduler.reconciler import Reconciler

__all__ = [
    "Autoscaler",
    "Copy",
    "CopyState",
    "Decision",
    "Demand",
    "Deployment",
    "DeviceFacts",
    "DeviceKind",
    "Download",
    "Explanation",
    "ModelNeed",
    "NodeFacts",
    "NodeVerdict",
    "Place",
    "Plan",
    "Rates",
    "Reconciler",
    "Remove",
    "Scale",
    "Shortfall",
    "Source",
]
