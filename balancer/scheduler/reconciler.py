"""The reconciler: compares what deployments ask for with the copies that exist and plans the difference.

One call of :meth:`Reconciler.plan` is one pass. It reads the nodes, the scheduled copies, the
models' needs, the rates and the demand, and returns a plan: copies to place (node, device, the
estimate and the reason) and copies to remove (unloading them; their files stay on the node). It does
no I/O: a later step carries the plan out and feeds what happened into the next pass.

- A copy on a node that is gone, offline or draining no longer counts and is placed elsewhere.
- A copy that failed to load is removed; the model is not retried on that node for
  ``failure_backoff_s`` (see ``filters.backoff``), and after ``n`` failures in a row (anywhere) it
  waits ``min(retry_base_s * 2 ** (n - 1), retry_max_s)`` before any new placement; a copy it
  placed becoming ready ends the streak.
- A placement's copy becoming ready teaches ``learner`` (when given) the model's load time or its
  source's rate (see ``balancer.scheduler.rates``); the caller passes the learnt rates to later passes.
- Placements within a pass are booked in the pass's ledger at once (memory, copies per node and
  zone), so the next placement sees them. Deployments are placed largest first, which packs the
  devices as first-fit-decreasing would.

Kept between passes, and nothing else: the autoscaler's targets and windows, when each model last
failed on each node, the failure streaks, and the last ``DECISIONS_KEPT`` decisions with the time
each placement actually took next to its estimate.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from balancer.scheduler.autoscaler import Autoscaler, Scale
from balancer.scheduler.deployment import Deployment
from balancer.scheduler.explain import verdicts
from balancer.scheduler.facts import (
    DEFAULT_CONTEXT_MB,
    MIB,
    WEIGHTS_OVERHEAD,
    Copy,
    CopyState,
    Demand,
    ModelNeed,
    NodeFacts,
)
from balancer.scheduler.filters import FAILURE_BACKOFF_S, default_filters
from balancer.scheduler.filters.memory_fit import MemoryFitFilter, gb
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.plan import Decision, Explanation, Place, Plan, Remove, Shortfall
from balancer.scheduler.ranking import Candidate, Ranking
from balancer.scheduler.rates import RateLearner, Rates
from balancer.scheduler.rules import Ask, Filter, Passed

RETRY_BASE_S = 10.0
RETRY_MAX_S = 300.0
DECISIONS_KEPT = 256
_PROGRESS = {CopyState.PLACING: 0, CopyState.DOWNLOADING: 1, CopyState.LOADING: 2, CopyState.READY: 3}


@dataclass(slots=True)
class _Pass:
    """What the last pass saw, for :meth:`Reconciler.explain`."""

    now: float
    deployments: dict[str, Deployment]
    nodes: Sequence[NodeFacts]
    needs: Mapping[str, ModelNeed]
    rates: Rates
    ledger: Ledger
    targets: dict[str, int]
    active: dict[str, int]


def _rough_mb(deployment: Deployment, need: ModelNeed | None) -> int:
    """A node-independent size, to place the largest deployments first."""
    if deployment.memory_mb:
        return deployment.memory_mb
    if need is None:
        return 0
    return need.required_mb or math.ceil(need.size_bytes / MIB * WEIGHTS_OVERHEAD) + DEFAULT_CONTEXT_MB


class Reconciler:
    """Plans passes toward the deployments (see the module's docstring); ``clock`` gives seconds."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        autoscaler: Autoscaler | None = None,
        failure_backoff_s: float = FAILURE_BACKOFF_S,
        retry_base_s: float = RETRY_BASE_S,
        retry_max_s: float = RETRY_MAX_S,
        learner: RateLearner | None = None,
    ) -> None:
        self._clock = clock
        self._learner = learner
        self._autoscaler = autoscaler or Autoscaler()
        self._filters: tuple[Filter, ...] = default_filters(failure_backoff_s)
        self._static = tuple(f for f in self._filters if f.static)
        self._dynamic = tuple(f for f in self._filters if not f.static)
        self._memory = next(f for f in self._filters if isinstance(f, MemoryFitFilter))
        self._ranking = Ranking()
        self._failure_backoff_s = failure_backoff_s
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self._failed: dict[str, dict[str, float]] = {}  # model -> node -> when it last failed there
        self._streak: dict[str, tuple[int, float]] = {}  # model -> (failures in a row, the last at)
        self._decisions: deque[Decision] = deque(maxlen=DECISIONS_KEPT)
        self._awaiting: dict[tuple[str, str], Decision] = {}  # placements whose outcome is not known
        self._last: _Pass | None = None

    def plan(
        self,
        deployments: Iterable[Deployment],
        nodes: Sequence[NodeFacts],
        copies: Iterable[Copy],
        needs: Mapping[str, ModelNeed],
        demand: Mapping[str, Demand] | None = None,
        rates: Rates | None = None,
    ) -> Plan:
        """One pass: the actions that bring the copies toward the deployments."""
        now = self._clock()
        rates = rates or Rates()
        demand = demand or {}
        wanted = {d.model_id: d for d in deployments}
        by_id = {n.id: n for n in nodes}
        ledger = Ledger(nodes)
        actions: list[Place | Remove] = []
        active: dict[str, list[Copy]] = {}
        present: set[tuple[str, str]] = set()
        for copy in copies:
            present.add((copy.model_id, copy.node_id))
            self._learn(copy, now)
            node = by_id.get(copy.node_id)
            gone = self._gone(copy, node, wanted)
            if gone:
                if copy.state is not CopyState.UNLOADING:
                    reachable = node is not None and node.online
                    actions.append(Remove(copy.model_id, copy.node_id, gone, unload=reachable))
                continue
            assert node is not None  # _gone says why otherwise
            need = needs.get(copy.model_id)
            need_mb = need.memory_mb(node, wanted[copy.model_id].memory_mb) if need is not None else 0
            ledger.book(copy.model_id, node, copy.device, need_mb)
            active.setdefault(copy.model_id, []).append(copy)
        self._forget(now, set(wanted))

        scaling: list[Scale] = []
        shortfalls: list[Shortfall] = []
        targets: dict[str, int] = {}
        eligible: dict[tuple[object, ...], tuple[list[NodeFacts], Counter[str]]] = {}
        order = sorted(wanted.values(), key=lambda d: (-_rough_mb(d, needs.get(d.model_id)), d.model_id))
        for deployment in order:
            model_id = deployment.model_id
            mine = active.get(model_id, [])
            slots = [c.slots for c in mine if c.state is CopyState.READY]
            target, scale = self._autoscaler.target(
                deployment, len(mine), len(slots), demand.get(model_id), now, slots=slots
            )
            targets[model_id] = target
            if scale is not None:
                scaling.append(scale)
                self._note(
                    Decision(now, model_id, "", f"scaled {scale.before} -> {scale.after}: {scale.reason}")
                )
            if len(mine) > target:
                for copy in self._surplus(mine, len(mine) - target, by_id, ledger):
                    reason = f"{len(mine)} copies where {target} are wanted"
                    actions.append(Remove(model_id, copy.node_id, reason))
                    self._note(
                        Decision(now, model_id, copy.node_id, f"removed from {copy.node_id}: {reason}")
                    )
            elif len(mine) < target:
                ask_for = target - len(mine)
                need = needs.get(model_id)
                placed, short = self._place(
                    deployment, ask_for, need, nodes, ledger, rates, now, eligible, actions
                )
                if short:
                    shortfalls.append(Shortfall(model_id, target, len(mine) + placed, short))
        # A placement whose copy vanished before it was ready (removed, its node gone) has no outcome.
        self._awaiting = {k: d for k, d in self._awaiting.items() if k in present or d.at == now}
        self._last = _Pass(
            now, wanted, nodes, needs, rates, ledger, targets, {m: len(c) for m, c in active.items()}
        )
        return Plan(tuple(actions), tuple(scaling), tuple(shortfalls))

    def explain(self, model_id: str) -> Explanation:
        """Every node of the last pass with the rule that excluded it or its scores for ``model_id``
        (after that pass's placements), and the model's recent decisions. KeyError when the last
        pass had no deployment of it."""
        last = self._last
        if last is None or model_id not in last.deployments:
            raise KeyError(model_id)
        deployment = last.deployments[model_id]
        need = last.needs.get(model_id)
        decisions = tuple(d for d in self._decisions if d.model_id == model_id)
        placed = sum(1 for d in decisions if d.at == last.now and d.estimate_s is not None)
        active = last.active.get(model_id, 0) + placed
        if need is None:
            return Explanation(model_id, last.targets[model_id], active, (), decisions)
        ask = Ask(deployment, need, last.now, last.rates, self._failed.get(model_id, {}))
        nodes = verdicts(ask, last.nodes, last.ledger, self._filters, self._ranking)
        return Explanation(model_id, last.targets[model_id], active, nodes, decisions)

    def expected_ready(self) -> dict[str, float]:
        """By model, when (on the clock) the soonest of its placements not yet ready is expected ready."""
        out: dict[str, float] = {}
        for (model_id, _), decision in self._awaiting.items():
            if decision.estimate_s is not None:
                at = decision.at + decision.estimate_s
                out[model_id] = min(at, out.get(model_id, at))
        return out

    def decisions(self) -> list[Decision]:
        """The recent decisions, oldest first."""
        return list(self._decisions)

    # a pass's steps

    def _learn(self, copy: Copy, now: float) -> None:
        """Takes in what happened to a copy: a failure starts a backoff, a ready copy ends the streak."""
        key = (copy.model_id, copy.node_id)
        if copy.state is CopyState.FAILED:
            at = copy.since or now
            failed = self._failed.setdefault(copy.model_id, {})
            if failed.get(copy.node_id) == at:
                return  # seen in an earlier pass
            failed[copy.node_id] = at
            count, _ = self._streak.get(copy.model_id, (0, 0.0))
            self._streak[copy.model_id] = (count + 1, at)
            decision = self._awaiting.pop(key, None)
            if decision is not None:
                decision.outcome = "failed"
        elif copy.state is CopyState.READY:
            decision = self._awaiting.pop(key, None)
            if decision is not None:  # newly ready: the model loads again, its failure streak ends
                self._streak.pop(copy.model_id, None)
                decision.outcome = "ready"
                start = copy.placed_at or decision.at
                decision.actual_s = max(0.0, (copy.since or now) - start)
                self._teach(decision, decision.actual_s)
                taught = f"; {decision.learned}" if decision.learned else ""
                decision.text += f"; ready in {decision.actual_s:.1f} s{taught}"

    def _teach(self, decision: Decision, actual_s: float) -> None:
        """Feeds a ready placement's actual time to the learner: a load time or a source's rate."""
        estimate = decision.estimate
        if self._learner is None or estimate is None or estimate.backend is None:
            return
        decision.learned = self._learner.learn(
            decision.model_id,
            estimate.backend,
            estimate.source,
            estimate.fetch_bytes,
            estimate.load_s,
            actual_s,
        )

    @staticmethod
    def _gone(copy: Copy, node: NodeFacts | None, wanted: Mapping[str, Deployment]) -> str:
        """Why ``copy`` no longer counts toward its deployment; "" when it does."""
        if copy.state is CopyState.FAILED:
            return "failed to load"
        if copy.state is CopyState.UNLOADING:
            return "unloading"
        if node is None:
            return "node removed"
        if not node.online:
            return "node offline"
        if node.draining:
            return "node draining"
        if copy.model_id not in wanted:
            return "no deployment asks for it"
        return ""

    def _forget(self, now: float, wanted: set[str]) -> None:
        self._autoscaler.forget(wanted)
        for model_id in list(self._failed):
            recent = {n: at for n, at in self._failed[model_id].items() if now - at < self._failure_backoff_s}
            if recent:
                self._failed[model_id] = recent
            else:
                del self._failed[model_id]

    def _retry_in(self, model_id: str, now: float) -> tuple[int, float]:
        """Failures in a row of ``model_id`` and the seconds before it may be placed again."""
        count, last = self._streak.get(model_id, (0, 0.0))
        if count == 0:
            return 0, 0.0
        wait = min(self._retry_base_s * 2 ** (count - 1), self._retry_max_s)
        return count, last + wait - now

    @staticmethod
    def _surplus(mine: list[Copy], count: int, by_id: Mapping[str, NodeFacts], ledger: Ledger) -> list[Copy]:
        """The copies to remove first: the least far along, then those in the most crowded zone,
        then on the busiest node."""

        def worst_first(copy: Copy) -> tuple[int, int, int, str]:
            node = by_id[copy.node_id]
            return (
                _PROGRESS[copy.state],
                -ledger.in_zone(copy.model_id, node.zone),
                -node.load,
                copy.node_id,
            )

        return sorted(mine, key=worst_first)[:count]

    def _eligible(
        self,
        ask: Ask,
        nodes: Sequence[NodeFacts],
        ledger: Ledger,
        cache: dict[tuple[object, ...], tuple[list[NodeFacts], Counter[str]]],
    ) -> tuple[list[NodeFacts], Counter[str]]:
        """Nodes passing the static filters, computed once a pass per (selector, format, backends)."""
        key = (tuple(sorted(ask.deployment.selector.items())), ask.need.format, ask.need.backends)
        found = cache.get(key)
        if found is None:
            passing: list[NodeFacts] = []
            excluded: Counter[str] = Counter()
            for node in nodes:
                for rule in self._static:
                    if isinstance(rule.check(ask, node, ledger), str):
                        excluded[rule.name] += 1
                        break
                else:
                    passing.append(node)
            found = cache[key] = (passing, excluded)
        return found

    def _place(
        self,
        deployment: Deployment,
        count: int,
        need: ModelNeed | None,
        nodes: Sequence[NodeFacts],
        ledger: Ledger,
        rates: Rates,
        now: float,
        cache: dict[tuple[object, ...], tuple[list[NodeFacts], Counter[str]]],
        actions: list[Place | Remove],
    ) -> tuple[int, str]:
        """Places up to ``count`` copies, best candidate first: how many, and why not more ("" if all)."""
        model_id = deployment.model_id
        if need is None:
            return 0, "the model is not in the catalogue"
        failures, wait = self._retry_in(model_id, now)
        if wait > 0:
            return 0, f"backing off after {failures} failures in a row; next try in {wait:.0f} s"
        ask = Ask(deployment, need, now, rates, self._failed.get(model_id, {}))
        passing, static_excluded = self._eligible(ask, nodes, ledger, cache)
        excluded = Counter(static_excluded)
        candidates: list[Candidate] = []
        # Where the need is the same on every node, the ledger's largest free device answers for the
        # memory filter on most nodes of a full fleet without its per-device walk and its text.
        same_need = deployment.memory_mb or need.required_mb
        for node in passing:
            fit: Passed | None = None
            for rule in self._dynamic:
                if rule is self._memory and same_need and ledger.largest_free(node.id) < same_need:
                    excluded[rule.name] += 1
                    break
                answer = rule.check(ask, node, ledger)
                if isinstance(answer, str):
                    excluded[rule.name] += 1
                    break
                if answer.device is not None:
                    fit = answer
            else:
                if fit is not None:
                    candidates.append(self._ranking.candidate(ask, node, fit, ledger))
        # Within a zone every candidate has the same spread, and a placement changes only its own
        # zone's spread and its own node's load: so each zone's candidates are sorted once, and each
        # copy goes to the best of the zones' heads, rescored (zones x copies, not nodes x copies).
        by_zone: dict[str, list[Candidate]] = {}
        for candidate in candidates:
            by_zone.setdefault(candidate.node.zone, []).append(candidate)
        for queue in by_zone.values():
            queue.sort(key=lambda c: c.key, reverse=True)  # the best last, to pop
        for left in range(count, 0, -1):
            heads = [self._ranking.rescored(queue[-1], ask, ledger) for queue in by_zone.values() if queue]
            if not heads:
                most_first = sorted(excluded.items(), key=lambda e: (-e[1], e[0]))
                why = ", ".join(f"{n} by {rule}" for rule, n in most_first)
                return (
                    count - left,
                    f"{left} more wanted, no node left that passes every filter ({why or 'no nodes'})",
                )
            best = min(heads, key=lambda c: c.key)
            by_zone[best.node.zone].pop()
            device = best.fit.device
            assert device is not None  # the memory filter always names one
            node = best.node
            ledger.book(model_id, node, device.index, best.fit.need_mb)
            free = f"{gb(best.fit.free_mb)} free on {device.label}"
            reason = f"placed on {node.id}: {free}, {best.estimate.text()}"
            place = Place(
                model_id, node.id, device.index, device.kind, best.fit.need_mb, best.estimate, reason
            )
            actions.append(place)
            decision = Decision(now, model_id, node.id, reason, best.estimate.seconds, estimate=best.estimate)
            self._note(decision)
            self._awaiting[(model_id, node.id)] = decision
            excluded["one-per-node"] += 1
        return count, ""

    def _note(self, decision: Decision) -> None:
        self._decisions.append(decision)
