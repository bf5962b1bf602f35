"""Scorer: copies of the same model already in the node's ``zone``; fewer is better.

Spreads a deployment's copies over zones, so losing one zone leaves copies elsewhere. Nodes without
a ``zone`` label score 0: across nodes, copies are spread by the one-copy-per-node filter.
"""

from __future__ import annotations

from balancer.scheduler.facts import NodeFacts
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rules import Ask


class SpreadScorer:
    name = "spread"

    def score(self, ask: Ask, node: NodeFacts, ledger: Ledger) -> int:
        return ledger.in_zone(ask.need.model_id, node.zone)
