"""The scheduler at work: every ``schedule_interval_s`` it reads the deployments from the store and the
fleet's facts, runs a reconcile pass, and (on the one replica holding the lease) carries the plan out.

Carrying out is queueing durable node commands, as deletes and pulls are: a placement is a pinned
prefetch (``CommandKind.PIN``: fetch, load, keep loaded), a removal an unload (``CommandKind.UNLOAD``:
the files stay). The copies are what the nodes report they keep pinned, plus the placements made here
that no node reports yet: so a replica taking the lease over finds the copies where they are.

Exactly one replica acts: each pass renews a lease row in the store (``Store.take_lease``); a replica
that dies stops renewing, and another takes the lease once it lapses (``schedule_lease_s``). Every
replica plans, so each can explain; only the holder queues commands and records decisions.

Each pass plans with the rates learnt from the placements that became ready (``RateLearner``): the
load times and transfer rates the fleet showed, in place of the defaults; the events say what each
ready copy taught.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from balancer.changes import CommandsQueued
from balancer.deployments import ready_copies
from balancer.fleet.nodes import queue_command
from balancer.fleet.view import Fleet
from balancer.parts import BalancerParts
from balancer.scheduler.autoscaler import Autoscaler
from balancer.scheduler.deployment import Deployment
from balancer.scheduler.facts import Copy, CopyState, ModelNeed, NodeFacts
from balancer.scheduler.facts_from_fleet import COPY_STATES, fleet_facts, pinned_copies
from balancer.scheduler.plan import Explanation, Place, Plan, Remove
from balancer.scheduler.rates import RateLearner
from balancer.scheduler.reconciler import Reconciler
from common.errors import LlmlbError
from common.types import CommandKind, ModelState

log = structlog.get_logger(__name__)

LEASE = "scheduler"
EVENTS_KEPT = 512
# A placement no node reports after this long (its command never carried out) is forgotten and placed again.
PLACING_TIMEOUT_S = 900.0
# A failure the node reported before a placement there is its own only once this long has passed
# without the node reporting anything else (its new attempt has not started yet).
STALE_FAILURE_S = 30.0
# An unload the node has not confirmed (it still reports the copy pinned) after this long is sent again.
UNLOADING_TIMEOUT_S = 60.0
# The reasons a removal is counted under in ``llmlb_schedule_decisions_total`` (a bounded set).
REMOVE_REASONS = (
    "failed to load",
    "node removed",
    "node offline",
    "node draining",
    "no deployment asks for it",
)


@dataclass(frozen=True, slots=True)
class Event:
    """One scheduling decision for operators: what was done to which model on which node, and why."""

    at: datetime
    action: str  # "place", "remove", "shortfall", "lease", "ready"
    model_id: str
    node_id: str
    reason: str
    # A placement's expected seconds to ready; on its "ready" event also the actual seconds.
    estimate_s: float | None = None
    actual_s: float | None = None
    outcome: str = ""  # "ready" for a placement's copy ready, "failed" for a copy removed as failed


class SchedulerLoop:
    """Runs reconcile passes until ``stop`` (see the module's docstring)."""

    def __init__(self, parts: BalancerParts, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._parts = parts
        self._fleet: Fleet = parts.fleet
        self._clock = clock
        self._interval_s = parts.config.schedule_interval_s
        self._lease_s = parts.config.schedule_lease_s
        self.learner = RateLearner()
        config = parts.config
        autoscaler = Autoscaler(
            queue_wait_s=config.scale_up_queue_wait_s,
            slots_per_copy=config.scale_up_inflight,
            up_window_s=config.scale_up_window_s,
            idle_s=config.scale_down_idle_s,
            down_window_s=config.scale_down_window_s,
        )
        self.reconciler = Reconciler(clock, learner=self.learner, autoscaler=autoscaler)
        self.acting = False
        self._pending: dict[tuple[str, str], Copy] = {}  # placed here, not yet reported pinned
        self._unloading: dict[tuple[str, str], float] = {}  # told to unload, still reported pinned
        self._seen: dict[tuple[str, str], tuple[CopyState, float]] = {}  # a copy's state and since when
        self._shortfalls: dict[str, str] = {}  # model -> the last shortfall reason recorded
        self._stale: set[tuple[str, str]] = set()  # placed where the model had failed before
        self._forgotten: set[tuple[str, str]] = set()  # copies on unreachable nodes, already noted
        self._observed: set[int] = set()  # decisions whose actual time is in the histogram
        self._events: deque[Event] = deque(maxlen=EVENTS_KEPT)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._targets: dict[str, int] = {}
        parts.metrics.watch_deployments(self._copies_gauge)

    # -- reads for the doors ------------------------------------------------------------------------

    def desired(self, deployment: Deployment) -> int:
        """The copies the deployment wants now: the last pass's target, else its floor."""
        return self._targets.get(deployment.model_id, deployment.floor)

    def explain(self, model_id: str) -> Explanation:
        """The last pass's verdict on every node for ``model_id``; KeyError when it had no deployment."""
        return self.reconciler.explain(model_id)

    def events(self) -> list[Event]:
        """Recent decisions, oldest first."""
        return list(self._events)

    def wake(self) -> None:
        """Runs the next pass now (a deployment changed)."""
        self._wake.set()

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if self.acting:
            with contextlib.suppress(Exception):  # the store is gone: the lease lapses by itself
                await self._parts.store.drop_lease(LEASE, self._parts.replicas.id)

    async def _run(self) -> None:
        while True:
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store unreachable, a node removed meanwhile: next pass
                log.warning("scheduler.pass_failed", error=repr(exc))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)

    # -- one pass -----------------------------------------------------------------------------------

    async def run_pass(self) -> Plan:
        """Takes or renews the lease, plans one pass and, holding the lease, carries it out."""
        parts = self._parts
        try:
            acting = await parts.store.take_lease(LEASE, parts.replicas.id, self._lease_s)
        except Exception as exc:
            log.warning("scheduler.lease_unavailable", error=repr(exc))
            acting = False
        if acting != self.acting:
            self.acting = acting
            self._note(
                "lease", "", "", "took the scheduler's lease" if acting else "lost the scheduler's lease"
            )
            self._pending.clear()  # another replica's placements are reported by the nodes instead
        deployments = await parts.store.list_deployments()
        needs: dict[str, ModelNeed] = {}
        for deployment in deployments:
            try:
                needs[deployment.model_id] = ModelNeed.of(await parts.catalog.get(deployment.model_id))
            except LlmlbError:
                continue  # deleted from the catalogue: the pass says so as a shortfall
        now = self._clock()
        nodes = fleet_facts(self._fleet)
        copies = self._copies(nodes, now)
        demand = parts.router.demand.snapshot()  # what this replica routed: autoscaled deployments follow it
        self.learner.keep(parts.catalog.knows)  # a model deleted from the catalogue is forgotten
        rates = self.learner.rates()
        plan = self.reconciler.plan(deployments, nodes, list(copies.values()), needs, demand, rates)
        self._targets = {d.model_id: self._target(d, plan) for d in deployments}
        # Requests for these go to their copies only; one finding none ready wakes the next pass.
        parts.router.deployed.update(set(self._targets), self.reconciler.expected_ready(), self.wake)
        if self.acting:
            await self._carry_out(plan, copies, now)
        self._observe()
        return plan

    def _target(self, deployment: Deployment, plan: Plan) -> int:
        scaled = next((s.after for s in plan.scaling if s.model_id == deployment.model_id), None)
        if scaled is not None:
            return scaled
        return (
            self._targets.get(deployment.model_id, deployment.floor)
            if deployment.autoscaled
            else deployment.floor
        )

    def _copies(self, nodes: list[NodeFacts], now: float) -> dict[tuple[str, str], Copy]:
        """The copies as the nodes report them, with this replica's placements and unloads in flight."""
        copies = pinned_copies(self._fleet, nodes, now)
        for key, placed in list(self._pending.items()):
            model_id, node_id = key
            if key in copies:
                del self._pending[key]  # the node reports it now
                continue
            status = self._fleet.state_on(node_id, model_id)
            state = CopyState.PLACING
            failed = status is not None and status.state is ModelState.FAILED
            if failed and key in self._stale and now - placed.placed_at < STALE_FAILURE_S:
                pass  # the failure before this placement: the node has not started again yet
            elif failed:
                state = CopyState.FAILED
            elif status is not None and status.state is not ModelState.ABSENT:
                self._stale.discard(key)
                state = COPY_STATES[status.state]
            if now - placed.placed_at > PLACING_TIMEOUT_S:
                del self._pending[key]
                continue
            copies[key] = Copy(
                model_id, node_id, placed.device, state, placed.since, placed.placed_at, placed.estimate_s
            )
        for key, told in list(self._unloading.items()):
            if key not in copies or now - told > UNLOADING_TIMEOUT_S:
                del self._unloading[key]  # unloaded (or to be told again)
            else:
                c = copies[key]
                copies[key] = Copy(c.model_id, c.node_id, c.device, CopyState.UNLOADING, told)
        # A state keeps the time it was first seen in, so a failure is learnt once.
        stamped: dict[tuple[str, str], Copy] = {}
        for key, c in copies.items():
            seen = self._seen.get(key)
            since = seen[1] if seen is not None and seen[0] is c.state else (c.since or now)
            self._seen[key] = (c.state, since)
            pending = self._pending.get(key)
            placed_at, estimate = (
                (pending.placed_at, pending.estimate_s) if pending else (c.placed_at, c.estimate_s)
            )
            stamped[key] = Copy(c.model_id, c.node_id, c.device, c.state, since, placed_at, estimate)
        self._seen = {k: v for k, v in self._seen.items() if k in copies}
        return stamped

    async def _carry_out(self, plan: Plan, copies: Mapping[tuple[str, str], Copy], now: float) -> None:
        parts = self._parts
        queued = False
        for action in plan.actions:
            key = (action.model_id, action.node_id)
            if isinstance(action, Place):
                try:
                    await queue_command(parts.store, action.node_id, CommandKind.PIN, action.model_id)
                except LlmlbError as exc:
                    log.warning(
                        "scheduler.place_failed",
                        model_id=action.model_id,
                        node_id=action.node_id,
                        error=exc.message,
                    )
                    continue
                queued = True
                status = self._fleet.state_on(action.node_id, action.model_id)
                if status is not None and status.state is ModelState.FAILED:
                    self._stale.add(key)
                self._pending[key] = Copy(
                    action.model_id,
                    action.node_id,
                    action.device,
                    CopyState.PLACING,
                    now,
                    now,
                    action.estimate.seconds,
                )
                self._note(
                    "place",
                    action.model_id,
                    action.node_id,
                    action.reason,
                    estimate_s=action.estimate.seconds,
                )
                parts.metrics.schedule_decision("place", "placed")
                parts.metrics.placement_seconds("estimate", action.estimate.seconds)
            elif isinstance(action, Remove):
                self._pending.pop(key, None)
                self._stale.discard(key)
                if not action.unload and key in self._forgotten:
                    continue  # its node is still unreachable: said once already
                if not action.unload:
                    self._forgotten.add(key)
                if action.unload:
                    try:
                        await queue_command(parts.store, action.node_id, CommandKind.UNLOAD, action.model_id)
                    except LlmlbError:
                        pass  # the node was removed meanwhile: nothing left to unload
                    else:
                        queued = True
                        self._unloading[key] = now
                copy = copies.get(key)
                failed = "failed" if action.reason == "failed to load" else ""
                self._note("remove", action.model_id, action.node_id, action.reason, outcome=failed)
                reason = action.reason if action.reason in REMOVE_REASONS else "surplus"
                parts.metrics.schedule_decision("remove", reason)
                log.info(
                    "scheduler.removed",
                    model_id=action.model_id,
                    node_id=action.node_id,
                    reason=action.reason,
                    state=copy.state.value if copy else "",
                )
        for shortfall in plan.shortfalls:
            if self._shortfalls.get(shortfall.model_id) != shortfall.reason:
                self._note(
                    "shortfall",
                    shortfall.model_id,
                    "",
                    f"{shortfall.active} of {shortfall.wanted} copies: {shortfall.reason}",
                )
                parts.metrics.schedule_decision("shortfall", "no fit")
        self._shortfalls = {s.model_id: s.reason for s in plan.shortfalls}
        self._forgotten &= set(copies)  # a node back (or removed) may lose a copy again later
        if queued:
            parts.sessions.notify_all()
            await parts.replicas.bus.publish(CommandsQueued())  # nodes held by other replicas

    def _observe(self) -> None:
        """Puts each placement's actual time to ready in the histogram, once."""
        for decision in self.reconciler.decisions() if self.acting else ():
            if decision.actual_s is not None and id(decision) not in self._observed:
                self._observed.add(id(decision))
                self._parts.metrics.placement_seconds("actual", decision.actual_s)
                took = f"ready in {decision.actual_s:.1f} s (estimated {decision.estimate_s or 0:.1f} s)"
                taught = f"; {decision.learned}" if decision.learned else ""
                self._note(
                    "ready",
                    decision.model_id,
                    decision.node_id,
                    took + taught,
                    estimate_s=decision.estimate_s,
                    actual_s=decision.actual_s,
                    outcome="ready",
                )
        live = {id(d) for d in self.reconciler.decisions()}
        self._observed &= live

    def _note(
        self,
        action: str,
        model_id: str,
        node_id: str,
        reason: str,
        *,
        estimate_s: float | None = None,
        actual_s: float | None = None,
        outcome: str = "",
    ) -> None:
        self._events.append(
            Event(datetime.now(UTC), action, model_id, node_id, reason, estimate_s, actual_s, outcome)
        )
        log.info("scheduler.decision", action=action, model_id=model_id, node_id=node_id, reason=reason)

    def _copies_gauge(self) -> dict[tuple[str, ...], float]:
        """``llmlb_deployment_copies{model,state}``: desired and ready copies of each deployment."""
        out: dict[tuple[str, ...], float] = {}
        for model_id, target in self._targets.items():
            out[(model_id, "desired")] = float(target)
            out[(model_id, "ready")] = float(ready_copies(self._parts, model_id))
        return out
