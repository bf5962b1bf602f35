"""Shedding: refusing at once a request that would wait past its time, instead of queueing it.

Per (model, capability) the router keeps how long a call holds a node's slot: an exponentially
weighted average of the calls that finished (``ServiceTimes``). A request that finds every capable
node busy, with ``ahead`` requests queued before it, waits about ``(ahead + 1) * service / slots``:
``slots`` calls run at once and one of them ends every ``service / slots`` seconds, and it needs
``ahead + 1`` of those ends. The slots are the capable nodes' in-flight limit summed; the service time,
measured from the balancer, includes any queueing on the node, so their ratio is the rate the nodes
really answer at.

Two things keep a pause from being read as overload. A pause of a node's or the balancer's process
holds every call in flight at once: each of them looks long, but the pause cost the fleet its length
once, not once per call, and the calls after it end as fast as before. So one call counts for at most
``SERVICE_JUMP`` times the average it joins (a real slowdown is still followed: the average grows by up
to 30 % a call, ten times slower within about 15 calls, and falls as fast as the calls do), and the
rate at which the last ``RATE_WINDOW`` calls really ended is the floor of the rate the wait is
estimated from. Without them 200 clients queued behind 4 slots of 18 ms calls, which expect about
0.9 s, were told 15 s after a 1.5 s pause and refused, while the nodes went on to answer within 3 s.

``judge`` refuses (``QUEUE_FULL``: 429 / RESOURCE_EXHAUSTED, with ``Retry-After`` the expected wait)
when that wait exceeds the longest the request may wait, or when the wait plus one service time would
pass the request's deadline: it would be answered too late to matter, and the node's time is better
spent on a request that can still be answered in time. The same holds for a request that finds a node
free (``at_once``): a deadline shorter than one service time is refused before any node starts on it.
The caller learns in milliseconds what it would otherwise learn at its deadline. Before any call has
finished there is no estimate, and nothing is shed by it (the queue's size and timeout still bound the
wait).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from balancer.router.candidates import Key
from common.errors import ErrorCode, LlmlbError

SERVICE_ALPHA = 0.3  # weight of the newest finished call in the service-time average
RATE_WINDOW = 32  # the observed rate is that of the last this many finished calls
SERVICE_JUMP = 2.0  # a finished call counts for at most this many times the average it joins...
SERVICE_CAP_FLOOR_S = 0.01  # ...or this, whichever is more (an average of 0 s can still grow)


class ServiceTimes:
    """How long a call of each (model, capability) held a node's slot, averaged over recent calls,
    and the rate at which the recent calls ended."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._mean: dict[Key, float] = {}
        self._ends: dict[Key, deque[float]] = {}

    def finished(self, key: Key, seconds: float) -> None:
        """A call for ``key`` held its slot for ``seconds``: fold it into the average (at most
        ``SERVICE_JUMP`` times the average, so one stalled call cannot multiply it)."""
        mean = self._mean.get(key)
        if mean is None:
            self._mean[key] = seconds
        else:
            counted = min(seconds, max(SERVICE_JUMP * mean, SERVICE_CAP_FLOOR_S))
            self._mean[key] = mean + SERVICE_ALPHA * (counted - mean)
        ends = self._ends.get(key)
        if ends is None:
            ends = self._ends[key] = deque(maxlen=RATE_WINDOW)
        ends.append(self._clock())

    def of(self, key: Key) -> float | None:
        """The average for ``key``; None before any call for it finished."""
        return self._mean.get(key)

    def rate(self, key: Key) -> float | None:
        """Calls of ``key`` ended per second over the last ``RATE_WINDOW``; None before that many."""
        ends = self._ends.get(key)
        if ends is None or len(ends) < RATE_WINDOW:
            return None
        span = ends[-1] - ends[0]
        return (len(ends) - 1) / span if span > 0 else None


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a queued request can expect: its wait for a slot, and then the call itself."""

    wait_s: float
    service_s: float


def estimate(
    ahead: int, service_s: float | None, slots: int, observed: float | None = None
) -> Estimate | None:
    """The expected wait of a request with ``ahead`` requests queued before it; None without data.

    Calls end ``slots / service_s`` a second, or at the ``observed`` rate when the recent calls really
    ended faster than that (their service times held a pause they all shared).
    """
    if service_s is None or slots <= 0:
        return None
    per_second = slots / service_s if service_s > 0 else float("inf")
    if observed is not None:
        per_second = max(per_second, observed)
    return Estimate((ahead + 1) / per_second, service_s)


def at_once(service_s: float | None) -> Estimate | None:
    """What a request that finds a node free can expect: no wait, then the call; None without data."""
    return None if service_s is None else Estimate(0.0, service_s)


def judge(expected: Estimate | None, model: str, *, wait_left_s: float, deadline_left_s: float) -> None:
    """Raises ``QUEUE_FULL`` when ``expected`` says the request would not be answered in its time.

    ``wait_left_s``: how much longer it may wait in the queue; ``deadline_left_s``: until its deadline.
    """
    if expected is None:
        return
    wait = expected.wait_s
    if wait > wait_left_s:
        why = f"the expected wait of {wait:.1f} s exceeds the {max(0.0, wait_left_s):.1f} s it may wait"
    elif wait + expected.service_s > deadline_left_s:
        why = (
            f"the expected wait of {wait:.1f} s and {expected.service_s:.1f} s to answer would pass "
            f"the request's deadline in {max(0.0, deadline_left_s):.1f} s"
        )
    else:
        return
    raise LlmlbError(
        ErrorCode.QUEUE_FULL,
        f"every node serving {model!r} is busy: {why}; retry later",
        retry_after_s=wait,
    )
