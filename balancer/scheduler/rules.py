"""The shapes every placement rule shares: what is asked, what a filter answers, and the protocols.

A filter answers ``Passed`` or the reason it excludes the node (a short string the operator reads);
a scorer answers a value, lower is better. Each rule lives in its own module under ``filters/`` or
``scorers/`` and reads only an ``Ask``, one ``NodeFacts`` and the pass's ``Ledger``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from balancer.scheduler.deployment import Deployment
from balancer.scheduler.facts import DeviceFacts, ModelNeed, NodeFacts
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rates import Rates


@dataclass(frozen=True, slots=True)
class Ask:
    """One copy to place: the deployment, the model's need, the rates, and the time.

    ``failed_on``: when this model last failed to load on each node, by node id (scheduler clock).
    """

    deployment: Deployment
    need: ModelNeed
    now: float
    rates: Rates = field(default_factory=Rates)
    failed_on: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Passed:
    """A filter let the node through; the memory filter also says on which device and how it fits."""

    device: DeviceFacts | None = None
    free_mb: int = 0
    need_mb: int = 0


PASSED = Passed()

Verdict = Passed | str


class Filter(Protocol):
    """A rule that may exclude a node. ``static``: its answer depends only on the node's facts and
    the deployment, never on the pass's accounting or the time, so it may be computed once a pass."""

    name: str
    static: bool

    def check(self, ask: Ask, node: NodeFacts, ledger: Ledger) -> Verdict: ...
