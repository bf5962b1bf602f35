"""Inference routing: which node answers each request, and carrying the call there, for both doors.

Modules, one concern each: ``routes`` (the table of calls), ``routing`` (the ``Router`` and its one
unary and one streaming path), ``candidates`` (nodes from the fleet, in tiers), ``picking`` (rules
every policy obeys), ``policy`` (routing policies by name), ``queue`` (the wait queue),
``failover`` (what a failed node call means), ``node_stats`` (latency, cooldown).
"""

from balancer.router.node_stats import FIRST_LATENCY_S, NodeStats
from balancer.router.policy import POLICIES, Policy
from balancer.router.routing import Router

__all__ = ["FIRST_LATENCY_S", "POLICIES", "NodeStats", "Policy", "Router"]
