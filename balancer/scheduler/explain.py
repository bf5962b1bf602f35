"""Why each node would or would not take a copy of a model: the rule that excluded it, or its scores."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from balancer.scheduler.facts import NodeFacts
from balancer.scheduler.filters.memory_fit import gb
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.ranking import Candidate, Ranking
from balancer.scheduler.rules import Ask, Filter, Passed


@dataclass(frozen=True, slots=True)
class NodeVerdict:
    """One node's answer for one model: ``rule`` and ``reason`` when excluded, else ``candidate``
    with its ``rank`` (1: where the next copy would go)."""

    node_id: str
    rule: str = ""
    reason: str = ""
    candidate: Candidate | None = None
    rank: int = 0

    def text(self) -> str:
        if self.candidate is None:
            return f"{self.node_id}: excluded by {self.rule}: {self.reason}"
        c = self.candidate
        device = c.fit.device.label if c.fit.device is not None else "?"
        return (
            f"{self.node_id}: #{self.rank}, {gb(c.fit.free_mb)} free on {device}, {c.estimate.text()}, "
            f"{c.spread} copies in its zone, load {c.load[0]} requests, {c.load[1]} copies"
        )


def verdict(
    ask: Ask, node: NodeFacts, ledger: Ledger, filters: Iterable[Filter], ranking: Ranking
) -> NodeVerdict:
    """Runs every filter in order; the first to exclude names the verdict, else the node is scored."""
    fit = Passed()
    for rule in filters:
        answer = rule.check(ask, node, ledger)
        if isinstance(answer, str):
            return NodeVerdict(node.id, rule.name, answer)
        if answer.device is not None:
            fit = answer
    return NodeVerdict(node.id, candidate=ranking.candidate(ask, node, fit, ledger))


def verdicts(
    ask: Ask, nodes: Iterable[NodeFacts], ledger: Ledger, filters: tuple[Filter, ...], ranking: Ranking
) -> tuple[NodeVerdict, ...]:
    """Every node's verdict: candidates best first (ranked), then the excluded ones by node id."""
    found = [verdict(ask, node, ledger, filters, ranking) for node in nodes]
    ranked = sorted((v.candidate for v in found if v.candidate is not None), key=lambda c: c.key)
    excluded = sorted((v for v in found if v.candidate is None), key=lambda v: v.node_id)
    numbered = [NodeVerdict(c.node.id, candidate=c, rank=i) for i, c in enumerate(ranked, 1)]
    return (*numbered, *excluded)
