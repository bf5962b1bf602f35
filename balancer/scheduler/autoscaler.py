"""Autoscaling of min/max deployments on demand; fixed deployments keep their count.

The thresholds, each a constructor parameter whose default is written here once (the balancer sets
them from ``LLMLB_SCALE_UP_QUEUE_WAIT``, ``LLMLB_SCALE_UP_INFLIGHT``, ``LLMLB_SCALE_UP_WINDOW``,
``LLMLB_SCALE_DOWN_IDLE`` and ``LLMLB_SCALE_DOWN_WINDOW``); each deployment is judged on its own demand:

- **Scale up** by one copy when, for ``up_window_s`` (10 s) without a break, requests waited on
  average more than ``queue_wait_s`` (2 s) for a slot, or the requests in flight per ready copy
  exceeded a copy's slots: those its node reports for the model (the sequences its engine runs at
  once), or ``slots_per_copy`` (4, a node's default slots) for a copy whose node reports none. Not
  again until every copy asked for is ready and a new window has passed, and never above
  ``max_copies``.
- **From zero**: a deployment at 0 copies with any request waiting or in flight gets one at once (the
  router wakes the scheduler for it; the request waits in the queue until the copy is ready).
- **Scale down** by one copy, never below ``min_copies``, when the model has had no request for
  ``idle_s`` (300 s, counted from the last answer's end), or when for ``down_window_s`` (300 s) the
  requests in flight would have kept one copy fewer under ``low_fraction`` (25 %) of its slots (the
  same slots as above).
  After a step down, the next one waits another full window: with ``min_copies`` 0 the last copy
  goes ``idle_s`` after the previous one.

It keeps a little memory per model between passes: the current target, and since when demand has
been high or low. On the first sight of a deployment (a balancer restart) the target is the number
of active copies, held within ``min_copies``..``max_copies``, so a restart removes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from balancer.scheduler.deployment import Deployment
from balancer.scheduler.facts import Demand

QUEUE_WAIT_S = 2.0
SLOTS_PER_COPY = 4
UP_WINDOW_S = 10.0
IDLE_S = 300.0
LOW_FRACTION = 0.25
DOWN_WINDOW_S = 300.0


@dataclass(frozen=True, slots=True)
class Scale:
    """A change of a deployment's target, and why."""

    model_id: str
    before: int
    after: int
    reason: str


@dataclass(slots=True)
class _Track:
    target: int
    hot_since: float | None = None  # demand above the scale-up thresholds since
    cold_since: float | None = None  # demand below the scale-down threshold since
    changed_at: float = 0.0
    first_seen: float = 0.0


class Autoscaler:
    """Decides how many copies each deployment should have now (see the module's docstring)."""

    def __init__(
        self,
        *,
        queue_wait_s: float = QUEUE_WAIT_S,
        slots_per_copy: int = SLOTS_PER_COPY,
        up_window_s: float = UP_WINDOW_S,
        idle_s: float = IDLE_S,
        low_fraction: float = LOW_FRACTION,
        down_window_s: float = DOWN_WINDOW_S,
    ) -> None:
        self.queue_wait_s = queue_wait_s
        self.slots_per_copy = slots_per_copy
        self.up_window_s = up_window_s
        self.idle_s = idle_s
        self.low_fraction = low_fraction
        self.down_window_s = down_window_s
        self._tracks: dict[str, _Track] = {}

    def forget(self, keep: set[str]) -> None:
        """Drop the memory of deployments no longer asked for."""
        for model_id in self._tracks.keys() - keep:
            del self._tracks[model_id]

    def target(
        self,
        deployment: Deployment,
        active: int,
        ready: int,
        demand: Demand | None,
        now: float,
        *,
        slots: Sequence[int] = (),
    ) -> tuple[int, Scale | None]:
        """The copies ``deployment`` should have now, and the change made, if any.

        ``active``: its copies placed and not failed; ``ready``: those answering; ``slots``: the slots
        each ready copy's node reports for it (0: none reported; empty: not known).
        """
        if not deployment.autoscaled:
            return deployment.floor, None
        low, high = deployment.floor, deployment.ceiling
        track = self._tracks.get(deployment.model_id)
        if track is None:
            track = _Track(min(max(active, low), high), changed_at=now, first_seen=now)
            self._tracks[deployment.model_id] = track
        before = track.target = min(max(track.target, low), high)
        demand = demand or Demand(deployment.model_id)
        per_copy = self._slots(slots)
        reason = self._up(track, deployment, demand, ready, per_copy, now)
        if not reason and track.hot_since is None:  # never down while demand is above the up thresholds
            reason = self._down(track, demand, per_copy, now, low)
        if track.target == before:
            return before, None
        track.changed_at = now
        track.hot_since = track.cold_since = None
        return track.target, Scale(deployment.model_id, before, track.target, reason)

    def _slots(self, slots: Sequence[int]) -> float:
        """A ready copy's slots on average: as its node reports them, else ``slots_per_copy``."""
        if not slots:
            return self.slots_per_copy
        return sum(s or self.slots_per_copy for s in slots) / len(slots)

    def _up(
        self, track: _Track, deployment: Deployment, demand: Demand, ready: int, slots: float, now: float
    ) -> str:
        if track.target == 0:
            if demand.waiting > 0 or demand.in_flight > 0:
                track.target = 1
                return "requests waiting with no copy"
            return ""
        per_copy = demand.in_flight / max(ready, 1)
        hot = demand.queue_wait_s > self.queue_wait_s or per_copy > slots
        if not hot:
            track.hot_since = None
            return ""
        if track.hot_since is None:
            track.hot_since = now
        settled = ready >= track.target
        if settled and now - track.hot_since >= self.up_window_s and track.target < deployment.ceiling:
            track.target += 1
            return (
                f"requests waited {demand.queue_wait_s:.1f} s on average, {per_copy:.1f} in flight per "
                f"ready copy, for {now - track.hot_since:.0f} s"
            )
        return ""

    def _down(self, track: _Track, demand: Demand, slots: float, now: float, low: int) -> str:
        if track.target <= low:
            track.cold_since = None
            return ""
        last = demand.last_request_at if demand.last_request_at is not None else track.first_seen
        quiet_since = max(last, track.changed_at)
        if demand.in_flight == 0 and demand.waiting == 0 and now - quiet_since >= self.idle_s:
            track.target -= 1
            return f"no request for {now - last:.0f} s"
        fewer = track.target - 1
        cold = fewer >= 1 and demand.in_flight / fewer < slots * self.low_fraction
        if not cold:
            track.cold_since = None
            return ""
        if track.cold_since is None:
            track.cold_since = now
        if now - max(track.cold_since, track.changed_at) >= self.down_window_s:
            track.target -= 1
            return (
                f"{demand.in_flight} in flight would keep {fewer} copies under "
                f"{self.low_fraction:.0%} of their slots for {now - track.cold_since:.0f} s"
            )
        return ""
