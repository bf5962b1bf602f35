"""The balancer's own view of each node's load and health: in-flight calls, latency, cooldown.

A node's load is this balancer's own calls in flight there now, plus the calls of others: what the
node last reported (its calls in flight plus queued, from every balancer replica) less what this
balancer had in flight there when that report arrived (``reported_now``). With several replicas each
sees only its own calls, and the others' share is what keeps them from all taking a busy node for an
idle one. A report is up to a heartbeat old: taken whole, it would make a node that just finished our
call look busy for that long, and a second call would queue behind a first on one node while another
idles; our own count is always current, so only the difference is taken from the report.

A node's latency is an exponentially weighted average of how long it took to start answering; a
node whose calls fail ``cooldown_failures`` times in a row is left alone for ``cooldown_s`` seconds
(measured on the injected clock), unless no other node is left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)

EWMA_ALPHA = 0.3  # weight of the newest answer in the latency average
FIRST_LATENCY_S = 0.05  # a node's latency average before its first answer


@dataclass(slots=True)
class NodeStats:
    """The balancer's own view of one node's load and health."""

    outstanding: int = 0
    latency_s: float = FIRST_LATENCY_S
    failures: int = 0  # consecutive
    cooldown_until: float = 0.0
    own_at_report: int = 0  # ``outstanding`` when the node's last load report arrived
    by_model: dict[str, int] = field(default_factory=dict)  # ``outstanding``, per model id

    def on_model(self, model_id: str) -> int:
        """Our calls in flight on the node for ``model_id`` (its reported slots bound them)."""
        return self.by_model.get(model_id, 0)

    def load(self, reported: int = 0) -> int:
        """Calls the node is busy with: ours now, plus the others' in its ``reported`` load."""
        return self.outstanding + max(0, reported - self.own_at_report)

    def score(self, reported: int = 0) -> tuple[int, float]:
        """How good a place for a new call this is, given the node's ``reported`` load: lower is better.

        Fewer calls first, then the lower latency average. Not their product: the average moves only
        when the node answers, so a node whose last answers were slow (long prompts, a busy spell)
        would look slow for as long as it was passed over, and be passed over for ever. Fewer calls
        first still sends more work to a faster node: it finishes sooner, so it has fewer calls.
        """
        return self.load(reported), self.latency_s


class NodeStatsTable:
    """Stats per node id, made on first use; records answers and faults and applies the cooldown."""

    def __init__(
        self,
        *,
        cooldown_failures: int,
        cooldown_s: float,
        clock: Callable[[], float],
        reported: Callable[[str], int] = lambda _node_id: 0,
    ) -> None:
        self._reported = reported
        self._cooldown_failures = cooldown_failures
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._stats: dict[str, NodeStats] = {}

    def of(self, node_id: str) -> NodeStats:
        """The stats of ``node_id``, created empty the first time it is asked for."""
        stats = self._stats.get(node_id)
        if stats is None:
            stats = self._stats[node_id] = NodeStats()
        return stats

    def score(self, node_id: str) -> tuple[int, float]:
        """The node's expected wait (``NodeStats.score``) with the load it last reported."""
        return self.of(node_id).score(self._reported(node_id))

    def load(self, node_id: str) -> int:
        """Calls the node is busy with: ours in flight there, plus the others' in its last report."""
        return self.of(node_id).load(self._reported(node_id))

    def started(self, node_id: str, model_id: str) -> None:
        """A call for ``model_id`` was handed to ``node_id``."""
        stats = self.of(node_id)
        stats.outstanding += 1
        stats.by_model[model_id] = stats.by_model.get(model_id, 0) + 1

    def ended(self, node_id: str, model_id: str) -> None:
        """A call ``started`` there is over (answered, failed or abandoned)."""
        stats = self.of(node_id)
        stats.outstanding -= 1
        left = stats.by_model.get(model_id, 0) - 1
        if left > 0:
            stats.by_model[model_id] = left
        else:
            stats.by_model.pop(model_id, None)

    def reported_now(self, node_id: str) -> None:
        """A load report from ``node_id`` just arrived: what we have in flight there is part of it."""
        stats = self.of(node_id)
        stats.own_at_report = stats.outstanding

    def answered(self, node_id: str, seconds: float) -> None:
        """The node started answering after ``seconds``: fold that into its latency, clear its faults."""
        stats = self.of(node_id)
        stats.latency_s += EWMA_ALPHA * (seconds - stats.latency_s)
        stats.failures = 0

    def faulted(self, node_id: str) -> None:
        """The node itself failed a call; enough faults in a row cool it down."""
        stats = self.of(node_id)
        stats.failures += 1
        if stats.failures >= self._cooldown_failures:
            stats.cooldown_until = self._clock() + self._cooldown_s
            log.warning("node.cooldown", node_id=node_id, failures=stats.failures, seconds=self._cooldown_s)

    def snapshot(self) -> dict[str, NodeStats]:
        """Every node's stats by id (the live records), for status views."""
        return dict(self._stats)
