"""Scorer: how busy the node is: its requests in flight and queued, then the scheduled copies it
holds (so one pass does not pile every new copy onto the same idle node); lower is better."""

from __future__ import annotations

from balancer.scheduler.facts import NodeFacts
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rules import Ask


class LeastLoadedScorer:
    name = "least-loaded"

    def score(self, ask: Ask, node: NodeFacts, ledger: Ledger) -> tuple[int, int]:
        return node.load, ledger.on_node(node.id)
