"""Routing policies: which of several equally good nodes gets the next request.

A policy sees only nodes that already passed the rules every policy obeys (``picking.pick``: not tried
yet, not cooling down, under the in-flight limit, in the best tier), at least one of them, and the
request's ``RouteKey`` (its prompt prefixes and affinity key; None for requests with no prompt to
reuse: embeddings, transcription, speech, images). It chooses one and says how (``Choice.outcome``).
Policies are chosen by name (``POLICIES``, ``LLMLB_ROUTING``); each documents its thresholds beside it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from balancer.router.candidates import Candidate
from balancer.router.node_stats import NodeStatsTable
from common.prefixes import Prefix

# How a choice was made, counted per policy (``llmlb_route_outcomes_total``).
HIT = "hit"  # went to a node holding part of the prompt
MISS = "miss"  # no node held enough of it (or it was not asked): chosen by load
YIELDED = "yielded"  # a node held it (or the affinity key named it) but was too busy: chosen by load
AFFINITY = "affinity"  # no node held it; the request's affinity key named the node
LOAD = "load"  # a request with no prompt to reuse (no ``RouteKey``): chosen by load alone


@dataclass(frozen=True, slots=True)
class RouteKey:
    """What a cache-aware choice reads from a chat or completion request, built once per request."""

    model_id: str
    prefixes: tuple[Prefix, ...] = ()
    affinity: str = ""  # ``prompt_cache_key``, else ``user``: requests sharing it share a prefix

    @property
    def chars(self) -> int:
        """Characters the longest prefix covers: the whole prompt, as far as prefixes name it."""
        return self.prefixes[-1].chars if self.prefixes else 0


class PrefixLookup(Protocol):
    """How much of a request's prompt a node holds computed (``prefix_index.PrefixIndex``)."""

    def held_chars(self, node_id: str, model_id: str, prefixes: Sequence[Prefix]) -> int: ...


@dataclass(frozen=True, slots=True)
class Choice:
    """The chosen node and how it was chosen (``HIT``, ``MISS``, ``YIELDED``, ``AFFINITY``, ``LOAD``)."""

    node: Candidate
    outcome: str


class Policy(Protocol):
    """Chooses one node among one or more that are equally eligible."""

    name: str

    def choose(self, nodes: Sequence[Candidate], stats: NodeStatsTable, key: RouteKey | None) -> Choice:
        """One of ``nodes`` (never empty) for the next request; ``key`` is None when it has no prompt."""
        ...


def _held_outcome(node: Candidate, key: RouteKey | None, lookup: PrefixLookup) -> str:
    """``HIT`` or ``MISS`` for a node a load-only policy chose, so every policy's hit rate is visible."""
    if key is None:
        return LOAD
    return HIT if lookup.held_chars(node.node_id, key.model_id, key.prefixes) else MISS


def _two_choices(nodes: Sequence[Candidate], stats: NodeStatsTable, rng: random.Random) -> Candidate:
    if len(nodes) == 1:
        return nodes[0]
    a, b = rng.sample(nodes, 2)
    return a if stats.score(a.node_id) <= stats.score(b.node_id) else b


class PowerOfTwoChoices:
    """Draws two nodes at random and takes the one with the lower score, blind to prompt caches.

    Score (``NodeStatsTable.score``): fewer calls in flight wins (this balancer's own calls plus the
    others' in the node's last report), then the lower latency average; ties go to the first drawn.
    Thresholds: none of its own; the latency average's weight (``EWMA_ALPHA`` = 0.3) and a new node's
    assumed latency (``FIRST_LATENCY_S`` = 50 ms) live in ``node_stats``. Two random draws, not the
    global best, so a burst of requests does not all land on the one node that looked best a moment ago.
    """

    name = "power-of-two"

    def __init__(self, rng: random.Random, lookup: PrefixLookup) -> None:
        self._rng = rng
        self._lookup = lookup

    def choose(self, nodes: Sequence[Candidate], stats: NodeStatsTable, key: RouteKey | None) -> Choice:
        node = _two_choices(nodes, stats, self._rng)
        return Choice(node, _held_outcome(node, key, self._lookup))


class RoundRobin:
    """Takes the eligible nodes in turn, ignoring load, latency and prompt caches.

    Thresholds: none. Useful as a baseline against the default, and for fleets of identical nodes
    where every request costs the same. The turn counter is shared by all models, so with a changing
    set of eligible nodes the order is fair over time, not strictly alternating.
    """

    name = "round-robin"

    def __init__(self, rng: random.Random, lookup: PrefixLookup) -> None:
        del rng  # takes no chances; the same constructor as every policy
        self._lookup = lookup
        self._turn = 0

    def choose(self, nodes: Sequence[Candidate], stats: NodeStatsTable, key: RouteKey | None) -> Choice:
        node = nodes[self._turn % len(nodes)]
        self._turn += 1
        return Choice(node, _held_outcome(node, key, self._lookup))


MIN_MATCH = 0.1  # a node must hold at least this share of the prompt's characters to count as a hit
YIELD_MARGIN = 2  # a preferred node yields when busier than the idlest by at least this many calls...
YIELD_RATIO = 2.0  # ...and by at least this factor (on calls + 1, so an idle node compares as 1)


class CacheAware:
    """Sends a request to the node that holds the longest prefix of its prompt, unless that node is
    much busier than the idlest one (the default policy for chat and completions).

    In order:

    1. **Hit.** The node holding the most of the prompt (``PrefixIndex``: reported by nodes, or
       predicted from where this balancer just sent the same prefix), if it holds at least
       ``min_match`` (10%) of the prompt's characters: below that the prompt work saved is too small to
       weigh against load. Nodes holding equally much: the one with the lower score.
    2. **Affinity.** No node holds enough: a request with an affinity key (``prompt_cache_key``, else
       ``user``) goes to the node the key hashes to (rendezvous hashing over the eligible nodes, so a
       node joining or leaving moves only its own share of keys). Its first turn then computes the
       prefix where its later turns will look for it, on every replica alike.
    3. **Miss.** Otherwise, power of two choices (``PowerOfTwoChoices``).

    **The guard.** A hot prefix (one system prompt, many users) must not pile onto the node that
    computed it while others idle. The node a hit or the affinity key prefers yields (power of two
    among the other nodes, counted as ``yielded``) when its load (our calls in flight plus the others'
    in its last report, ``NodeStatsTable.load``) exceeds the idlest eligible node's by at least
    ``yield_margin`` (2) calls AND is at least ``yield_ratio`` (2x) of it, counted as calls + 1. Nodes
    here are llama.cpp servers with 1 to 4 slots: two calls more than an idle node is already a queue on
    a one-slot node, and recomputing a prompt costs less than waiting behind two whole answers. The
    ratio keeps a busy fleet (6 vs 4 calls) from scattering conversations over a difference that is
    only noise. Once a request yields, the node it went to holds the prefix too, so a hot prefix spreads
    over as many nodes as its load needs and no more.
    """

    name = "cache-aware"

    def __init__(
        self,
        rng: random.Random,
        lookup: PrefixLookup,
        *,
        min_match: float = MIN_MATCH,
        yield_margin: int = YIELD_MARGIN,
        yield_ratio: float = YIELD_RATIO,
    ) -> None:
        self._rng = rng
        self._lookup = lookup
        self._min_match = min_match
        self._yield_margin = yield_margin
        self._yield_ratio = yield_ratio

    def choose(self, nodes: Sequence[Candidate], stats: NodeStatsTable, key: RouteKey | None) -> Choice:
        if key is None:
            return Choice(_two_choices(nodes, stats, self._rng), LOAD)
        preferred, outcome = self._preferred(nodes, stats, key)
        if preferred is None:
            return Choice(_two_choices(nodes, stats, self._rng), MISS)
        idlest = min(stats.load(n.node_id) for n in nodes)
        if self._too_busy(stats.load(preferred.node_id), idlest):
            rest = [n for n in nodes if n.node_id != preferred.node_id]
            return Choice(_two_choices(rest, stats, self._rng), YIELDED)
        return Choice(preferred, outcome)

    def _preferred(
        self, nodes: Sequence[Candidate], stats: NodeStatsTable, key: RouteKey
    ) -> tuple[Candidate | None, str]:
        if key.chars:
            held = [(self._lookup.held_chars(n.node_id, key.model_id, key.prefixes), n) for n in nodes]
            most = max(chars for chars, _ in held)
            if most and most >= self._min_match * key.chars:
                holders = [n for chars, n in held if chars == most]
                return min(holders, key=lambda n: stats.score(n.node_id)), HIT
        if key.affinity:
            return max(nodes, key=lambda n: _rendezvous(key.affinity, n.node_id)), AFFINITY
        return None, MISS

    def _too_busy(self, load: int, idlest: int) -> bool:
        return load - idlest >= self._yield_margin and load + 1 >= self._yield_ratio * (idlest + 1)


def _rendezvous(key: str, node_id: str) -> bytes:
    """The weight of ``node_id`` for ``key``: the highest weight wins (highest random weight hashing)."""
    return hashlib.blake2b(f"{key}\x00{node_id}".encode(errors="surrogatepass"), digest_size=8).digest()


POLICIES: dict[str, Callable[[random.Random, PrefixLookup], Policy]] = {
    CacheAware.name: CacheAware,
    PowerOfTwoChoices.name: PowerOfTwoChoices,
    RoundRobin.name: RoundRobin,
}
DEFAULT_POLICY = CacheAware.name


def make_policy(name: str, rng: random.Random, lookup: PrefixLookup) -> Policy:
    """The policy called ``name``, drawing on ``rng`` where it takes chances and ``lookup`` for caches."""
    try:
        return POLICIES[name](rng, lookup)
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
