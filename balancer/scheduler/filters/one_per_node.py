"""Filter: a node holds a model once (it loads a model by its id), so it takes no second copy."""

from __future__ import annotations

from balancer.scheduler.facts import NodeFacts
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rules import PASSED, Ask, Verdict


class OnePerNodeFilter:
    name = "one-per-node"
    static = False

    def check(self, ask: Ask, node: NodeFacts, ledger: Ledger) -> Verdict:
        if ledger.holds(ask.need.model_id, node.id):
            return "holds a copy already"
        return PASSED
