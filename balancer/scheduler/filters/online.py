"""Filter: only a node that is online and not draining takes a copy."""

from __future__ import annotations

from balancer.scheduler.facts import NodeFacts
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rules import PASSED, Ask, Verdict


class OnlineFilter:
    name = "online"
    static = True

    def check(self, ask: Ask, node: NodeFacts, ledger: Ledger) -> Verdict:
        if not node.online:
            return "offline"
        if node.draining:
            return "draining"
        return PASSED
