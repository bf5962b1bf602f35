"""Filter: a node takes a copy only when its labels hold every ``key=value`` of the deployment's selector."""

from __future__ import annotations

from balancer.scheduler.facts import NodeFacts
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rules import PASSED, Ask, Verdict


class SelectorFilter:
    name = "selector"
    static = True

    def check(self, ask: Ask, node: NodeFacts, ledger: Ledger) -> Verdict:
        for key, value in sorted(ask.deployment.selector.items()):
            have = node.labels.get(key)
            if have != value:
                return f"label {key}={value} wanted, node has " + (f"{key}={have}" if have else f"no {key}")
        return PASSED
