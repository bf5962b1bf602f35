"""What the router sees of each model's demand, for the scheduler's autoscaler: requests in flight,
requests waiting for a node, how long they waited (mean over a sliding window) and the last request
(its start or its end, whichever came later: a model is idle from when its last answer ended).

Counted on this replica only; the replica acting on deployments scales by what it routes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from balancer.scheduler.facts import Demand

WINDOW_S = 10.0  # the queue wait is the mean over the waits that ended this recently


class DemandMeter:
    """Per-model request counts; ``clock`` is the router's (the scheduler's: monotonic seconds)."""

    def __init__(self, clock: Callable[[], float], window_s: float = WINDOW_S) -> None:
        self._clock = clock
        self._window_s = window_s
        self._in_flight: dict[str, int] = {}
        self._waiting: dict[str, int] = {}
        self._waits: dict[str, deque[tuple[float, float]]] = {}  # model -> (ended at, seconds waited)
        self._last: dict[str, float] = {}

    def started(self, model_id: str) -> None:
        self._in_flight[model_id] = self._in_flight.get(model_id, 0) + 1
        self._last[model_id] = self._clock()

    def finished(self, model_id: str) -> None:
        self._in_flight[model_id] = max(0, self._in_flight.get(model_id, 0) - 1)
        self._last[model_id] = self._clock()

    def wait_started(self, model_id: str) -> float:
        self._waiting[model_id] = self._waiting.get(model_id, 0) + 1
        return self._clock()

    def wait_ended(self, model_id: str, since: float) -> None:
        now = self._clock()
        self._waiting[model_id] = max(0, self._waiting.get(model_id, 0) - 1)
        self._waits.setdefault(model_id, deque(maxlen=1024)).append((now, now - since))

    def snapshot(self) -> dict[str, Demand]:
        """Each model's demand now (models never asked for are absent)."""
        cutoff = self._clock() - self._window_s
        out: dict[str, Demand] = {}
        for model_id, last in self._last.items():
            waits = self._waits.get(model_id, deque())
            while waits and waits[0][0] < cutoff:
                waits.popleft()
            mean = sum(w for _, w in waits) / len(waits) if waits else 0.0
            out[model_id] = Demand(
                model_id,
                queue_wait_s=mean,
                waiting=self._waiting.get(model_id, 0),
                in_flight=self._in_flight.get(model_id, 0),
                last_request_at=last,
            )
        return out
