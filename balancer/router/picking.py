"""The rules every routing policy obeys before it chooses: which ranked candidates are eligible now.

In order: a node this request already tried is out; a node cooling down is out unless every remaining
node is (then trying one beats refusing); a node at its in-flight limit is out (the request queues
instead); only the best remaining tier is kept. The policy chooses within that tier (even one node, so
that it says how the choice was made).

The in-flight limit (``capacity``) follows what the node reported. A node that reported its slots for
the model (the sequences its engine runs at once: batched llama.cpp's sequences, a per-context
engine's contexts, 1 for an engine serving one call at a time) takes that many calls for the model,
plus ``queue_allowance`` (default 1) waiting on the node: as llama.cpp's server defers a request no
slot can take and starts it the moment a slot frees, and SGLang's scheduler draws each step from its
own waiting queue, one call waiting there refills a finished slot at the engine's next step instead of
a round trip through the balancer later; more would only wait on this node while another may free
sooner. A node that reported nothing for the model (an older node, a model still loading or not
loaded) takes ``max_inflight`` calls in all, whatever their model, as before slots were reported.
The limits count this balancer's own calls (each replica keeps its own).
"""

from __future__ import annotations

from collections.abc import Sequence

from balancer.router.candidates import Candidate
from balancer.router.node_stats import NodeStatsTable
from balancer.router.policy import Choice, Policy, RouteKey


def capacity(candidate: Candidate, *, max_inflight: int, queue_allowance: int) -> int:
    """Calls this balancer gives ``candidate`` at once: for its model, the slots it reported plus the
    queue allowance; with no slots reported, ``max_inflight`` over the whole node."""
    return candidate.slots + queue_allowance if candidate.slots > 0 else max_inflight


def has_room(
    candidate: Candidate, stats: NodeStatsTable, model_id: str, *, max_inflight: int, queue_allowance: int
) -> bool:
    """Whether ``candidate`` takes one more call for ``model_id`` now (``capacity``)."""
    limit = capacity(candidate, max_inflight=max_inflight, queue_allowance=queue_allowance)
    node = stats.of(candidate.node_id)
    return (node.on_model(model_id) if candidate.slots > 0 else node.outstanding) < limit


def pick(
    candidates: Sequence[Candidate],
    exclude: set[str],
    stats: NodeStatsTable,
    *,
    now: float,
    max_inflight: int,
    policy: Policy,
    key: RouteKey | None = None,
    model_id: str = "",
    queue_allowance: int = 0,
) -> Choice | None:
    """The node for the next try, or None when every eligible node is busy (or none is left)."""
    usable = [c for c in candidates if c.node_id not in exclude]
    healthy = [c for c in usable if stats.of(c.node_id).cooldown_until <= now]
    pool = healthy or usable  # every node cooling down: try one rather than refuse
    free = [
        c
        for c in pool
        if has_room(c, stats, model_id, max_inflight=max_inflight, queue_allowance=queue_allowance)
    ]
    if not free:
        return None
    best = free[0].tier  # candidates come best tier first
    tier = [c for c in free if c.tier == best]
    return policy.choose(tier, stats, key)
