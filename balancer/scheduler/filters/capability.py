"""Filter: a node takes a copy only when one of its runtimes loads the model's weight format and the
model has files for the node's backend (a Metal-only model never goes to a CUDA node)."""

from __future__ import annotations

from balancer.scheduler.facts import NodeFacts
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rules import PASSED, Ask, Verdict


class CapabilityFilter:
    name = "capability"
    static = True

    def check(self, ask: Ask, node: NodeFacts, ledger: Ledger) -> Verdict:
        if ask.need.format not in node.formats:
            return f"no runtime for {ask.need.format} files"
        if not ask.need.runs_on(node.backend):
            return f"no files for the {node.backend} backend"
        return PASSED
