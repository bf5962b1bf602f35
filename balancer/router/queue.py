"""The wait queue: where a request waits when every node that could serve it is busy.

One bounded FIFO queue per (model, capability), ``queue_size`` requests in all. A freed slot wakes the
oldest waiter that the freed node could serve, not every waiter; a waiter that loses the slot to a new
arrival keeps its place at the front. A full queue refuses at once with ``QUEUE_FULL`` and a
``retry_after``; so does a request whose expected wait (``shedding``) exceeds ``max_wait_s`` or would
take it past its deadline, and a queued one whose expected wait, looked at again each time it looks
for a node, no longer fits what it has left. A request that waits past ``queue_timeout_s`` (or its own
deadline) gets ``TIMEOUT`` and is never handed a node.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from contextlib import suppress

from balancer.router.candidates import Candidate, Key
from balancer.router.shedding import Estimate, ServiceTimes, estimate, judge
from common.errors import ErrorCode, LlmlbError

QUEUE_RECHECK_S = 0.5  # queued requests also look again this often, for nodes that came online
QUEUE_FULL_RETRY_AFTER_S = 1.0


class WaitQueue:
    """The waiting room in front of busy nodes."""

    def __init__(
        self,
        *,
        queue_size: int,
        queue_timeout_s: float,
        clock: Callable[[], float],
        serves: Callable[[Key, str], bool],
        max_wait_s: float | None = None,
        service: ServiceTimes | None = None,
        recheck_s: float = QUEUE_RECHECK_S,
    ) -> None:
        """``serves(key, node_id)`` says whether a freed node could serve ``key``'s waiters.

        ``service`` holds the recent service times the expected wait is estimated from (none: no
        estimate, nothing shed); ``max_wait_s`` is the longest expected wait a request is queued for
        (default: the queue timeout).
        """
        self._recheck_s = recheck_s
        self._queue_size = queue_size
        self._queue_timeout_s = queue_timeout_s
        self._max_wait_s = queue_timeout_s if max_wait_s is None else max_wait_s
        self._service = service if service is not None else ServiceTimes()
        self._clock = clock
        self._serves = serves
        self._queues: dict[Key, deque[asyncio.Event]] = {}
        self.waiting = 0  # requests in the queue now

    async def wait(
        self,
        key: Key,
        deadline: float,
        attempt: Callable[[], Candidate | None],
        slots: Callable[[], int] = lambda: 0,
        ready_in: Callable[[], float | None] = lambda: None,
    ) -> Candidate:
        """Waits in ``key``'s queue until ``attempt()`` finds a node, and returns it.

        ``attempt`` returns None while every node is busy (or none is ready yet) and raises when no
        node is left at all; ``slots()`` is how many calls the nodes that could serve ``key`` take at
        once; ``ready_in()``, while there are none, the seconds until one is expected ready (a cold
        start's placement estimate; None: unknown, and nothing is shed by it).
        """
        now = self._clock()
        queue = self._queues.get(key)
        ahead = len(queue) if queue is not None else 0
        if self.waiting >= self._queue_size:
            expected = self._expected(key, ahead, slots, ready_in)
            raise LlmlbError(
                ErrorCode.QUEUE_FULL,
                f"every node serving {key[0]!r} is busy and the queue is full; retry shortly",
                retry_after_s=expected.wait_s if expected is not None else QUEUE_FULL_RETRY_AFTER_S,
            )
        until = min(deadline, now + self._queue_timeout_s)
        judge(
            self._expected(key, ahead, slots, ready_in),
            key[0],
            wait_left_s=min(self._max_wait_s, until - now),
            deadline_left_s=deadline - now,
        )
        turn = asyncio.Event()
        self._queues.setdefault(key, deque()).append(turn)
        self.waiting += 1
        served = False
        try:
            while True:
                left = until - self._clock()
                if left <= 0:
                    raise LlmlbError(ErrorCode.TIMEOUT, f"waited too long for a free node serving {key[0]!r}")
                with suppress(TimeoutError):
                    await asyncio.wait_for(turn.wait(), min(left, self._recheck_s))
                now = self._clock()
                if now >= until:  # woken too late: a node now would only start work nobody waits for
                    raise LlmlbError(ErrorCode.TIMEOUT, f"waited too long for a free node serving {key[0]!r}")
                node = attempt()
                if node is not None:
                    served = True
                    return node
                if turn.is_set():  # woken, but another request took the slot first: keep our place
                    turn.clear()
                    # Looked up again: the key's queue may have emptied and gone while this one was out.
                    self._queues.setdefault(key, deque()).appendleft(turn)
                # The service time may have grown since it queued: leave now if it can no longer make it.
                judge(
                    self._expected(key, self._ahead_of(key, turn), slots, ready_in),
                    key[0],
                    wait_left_s=until - now,
                    deadline_left_s=deadline - now,
                )
        finally:
            self.waiting -= 1
            queue = self._queues.get(key)
            if queue is not None and turn in queue:
                queue.remove(turn)
            elif turn.is_set() and not served:
                self.wake(None)  # woken but leaving without the slot: hand the turn on
            if queue is not None and not queue:
                del self._queues[key]

    def _expected(
        self, key: Key, ahead: int, slots: Callable[[], int], ready_in: Callable[[], float | None]
    ) -> Estimate | None:
        """The expected wait: by the service time over the slots, or with no slot yet (a cold start)
        the time until the first node is ready; None without data. Never a refusal for lack of data."""
        service = self._service.of(key)
        count = slots()
        if count > 0:
            return estimate(ahead, service, count, self._service.rate(key))
        cold = ready_in()
        return None if cold is None else Estimate(cold, service or 0.0)

    def _ahead_of(self, key: Key, turn: asyncio.Event) -> int:
        """How many requests are queued before ``turn`` in ``key``'s queue."""
        queue = self._queues.get(key)
        return queue.index(turn) if queue is not None and turn in queue else 0

    def wake(self, node_id: str | None) -> None:
        """Wakes the oldest queued request that ``node_id`` could serve (any, when None)."""
        for key, queue in self._queues.items():
            if queue and (node_id is None or self._serves(key, node_id)):
                queue.popleft().set()
                return
