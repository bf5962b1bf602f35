"""The combined ranking of the nodes that passed every filter: ready soonest, then spread, then load.

Ready-soonest times are compared in buckets of ``READY_BUCKET_S`` (5 s): estimates are rough (rates
and load times are averages), so a node 2 s slower but in another zone or idle is as good a choice;
within a bucket, spread over zones decides, then the node's load, then the exact estimate, then the
node id (so a pass is deterministic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from balancer.scheduler.facts import NodeFacts
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rules import Ask, Passed
from balancer.scheduler.scorers import Estimate, LeastLoadedScorer, ReadySoonestScorer, SpreadScorer

READY_BUCKET_S = 5.0


def ready_bucket(seconds: float) -> int:
    """Which ``READY_BUCKET_S``-wide bucket an estimate falls in: 0-5 s is 0, 5-10 s is 1, ..."""
    return math.floor(seconds / READY_BUCKET_S)


@dataclass(slots=True)  # not frozen: a pass makes thousands, and frozen ones are slower to build
class Candidate:
    """A node that passed every filter, with the device it fits on and each scorer's value."""

    node: NodeFacts
    fit: Passed
    estimate: Estimate
    spread: int
    load: tuple[int, int]

    @property
    def key(self) -> tuple[int, int, tuple[int, int], float, str]:
        """Lower is better: the ranking described in the module's docstring."""
        return (
            ready_bucket(self.estimate.seconds),
            self.spread,
            self.load,
            self.estimate.seconds,
            self.node.id,
        )


class Ranking:
    """Scores a node that passed the filters; ``rank`` orders such candidates, best first."""

    def __init__(self) -> None:
        self.ready = ReadySoonestScorer()
        self.spread = SpreadScorer()
        self.load = LeastLoadedScorer()

    def candidate(self, ask: Ask, node: NodeFacts, fit: Passed, ledger: Ledger) -> Candidate:
        return Candidate(
            node,
            fit,
            self.ready.score(ask, node, ledger),
            self.spread.score(ask, node, ledger),
            self.load.score(ask, node, ledger),
        )

    def rescored(self, candidate: Candidate, ask: Ask, ledger: Ledger) -> Candidate:
        """The candidate with the scores a placement in this pass may have changed (spread, load)."""
        node = candidate.node
        return Candidate(
            node,
            candidate.fit,
            candidate.estimate,
            self.spread.score(ask, node, ledger),
            self.load.score(ask, node, ledger),
        )

    @staticmethod
    def rank(candidates: list[Candidate]) -> list[Candidate]:
        return sorted(candidates, key=lambda c: c.key)
