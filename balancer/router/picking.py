"""The rules every routing policy obeys before it chooses: which ranked candidates are eligible now.

In order: a node this request already tried is out; a node cooling down is out unless every remaining
node is (then trying one beats refusing); a node at the in-flight limit is out (the request queues
instead); only the best remaining tier is kept. The policy chooses within that tier (even one node, so
that it says how the choice was made).
"""

from __future__ import annotations

from collections.abc import Sequence

from balancer.router.candidates import Candidate
from balancer.router.node_stats import NodeStatsTable
from balancer.router.policy import Choice, Policy, RouteKey


def pick(
    candidates: Sequence[Candidate],
    exclude: set[str],
    stats: NodeStatsTable,
    *,
    now: float,
    max_inflight: int,
    policy: Policy,
    key: RouteKey | None = None,
) -> Choice | None:
    """The node for the next try, or None when every eligible node is busy (or none is left)."""
    usable = [c for c in candidates if c.node_id not in exclude]
    healthy = [c for c in usable if stats.of(c.node_id).cooldown_until <= now]
    pool = healthy or usable  # every node cooling down: try one rather than refuse
    free = [c for c in pool if stats.of(c.node_id).outstanding < max_inflight]
    if not free:
        return None
    best = free[0].tier  # candidates come best tier first
    tier = [c for c in free if c.tier == best]
    return policy.choose(tier, stats, key)
