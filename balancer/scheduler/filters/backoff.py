"""Filter: a node where the model failed to load is not given it again for a while.

``FAILURE_BACKOFF_S`` (300 s): long enough that a node out of memory or missing a driver is not
retried every pass, short enough that a passing fault (a full disk cleaned) heals by itself.
"""

from __future__ import annotations

from balancer.scheduler.facts import NodeFacts
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rules import PASSED, Ask, Verdict

FAILURE_BACKOFF_S = 300.0


class BackoffFilter:
    name = "backoff"
    static = False

    def __init__(self, backoff_s: float = FAILURE_BACKOFF_S) -> None:
        self.backoff_s = backoff_s

    def check(self, ask: Ask, node: NodeFacts, ledger: Ledger) -> Verdict:
        failed_at = ask.failed_on.get(node.id)
        if failed_at is None:
            return PASSED
        left = failed_at + self.backoff_s - ask.now
        if left > 0:
            return f"failed to load it {ask.now - failed_at:.0f} s ago; retried here in {left:.0f} s"
        return PASSED
