"""Routing policies: which of several equally good nodes gets the next request.

A policy sees only nodes that already passed the rules every policy obeys (``picking.pick``: not tried
yet, not cooling down, under the in-flight limit, in the best tier), always at least two of them, and
chooses one. Policies are chosen by name (``POLICIES``); each documents its thresholds beside it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from balancer.router.candidates import Candidate
from balancer.router.node_stats import NodeStatsTable


class Policy(Protocol):
    """Chooses one node among two or more that are equally eligible."""

    name: str

    def choose(self, nodes: Sequence[Candidate], stats: NodeStatsTable) -> Candidate:
        """One of ``nodes`` (never empty, usually two or more) for the next request."""
        ...


class PowerOfTwoChoices:
    """Draws two nodes at random and takes the one with the lower score (the default policy).

    Score = (calls in flight + 1) x latency average (``NodeStatsTable.score``; in flight is the larger
    of this balancer's own and the node's reported count), so a node that is both
    idle and fast wins; ties go to the first drawn. Thresholds: none of its own; the latency average's
    weight (``EWMA_ALPHA`` = 0.3) and a new node's assumed latency (``FIRST_LATENCY_S`` = 50 ms) live in
    ``node_stats``. Two random draws, not the global best, so a burst of requests does not all land on
    the one node that looked best a moment ago.
    """

    name = "power-of-two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, nodes: Sequence[Candidate], stats: NodeStatsTable) -> Candidate:
        if len(nodes) == 1:
            return nodes[0]
        a, b = self._rng.sample(nodes, 2)
        return a if stats.score(a.node_id) <= stats.score(b.node_id) else b


class RoundRobin:
    """Takes the eligible nodes in turn, ignoring load and latency.

    Thresholds: none. Useful as a baseline against the default, and for fleets of identical nodes
    where every request costs the same. The turn counter is shared by all models, so with a changing
    set of eligible nodes the order is fair over time, not strictly alternating.
    """

    name = "round-robin"

    def __init__(self, rng: random.Random) -> None:
        del rng  # takes no chances; the same constructor as every policy
        self._turn = 0

    def choose(self, nodes: Sequence[Candidate], stats: NodeStatsTable) -> Candidate:
        node = nodes[self._turn % len(nodes)]
        self._turn += 1
        return node


POLICIES: dict[str, Callable[[random.Random], Policy]] = {
    PowerOfTwoChoices.name: PowerOfTwoChoices,
    RoundRobin.name: RoundRobin,
}
DEFAULT_POLICY = PowerOfTwoChoices.name


def make_policy(name: str, rng: random.Random) -> Policy:
    """The policy called ``name``, drawing on ``rng`` where it takes chances."""
    try:
        return POLICIES[name](rng)
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
