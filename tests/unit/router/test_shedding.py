"""Shedding: a request that would wait past its time is refused at once, with the wait it would have had.

The rule without sockets: a ``WaitQueue`` on a clock the test moves, with service times the test
records, as the router records them when calls finish.
"""

from __future__ import annotations

import asyncio

import pytest

from balancer.router.candidates import Candidate, Key
from balancer.router.queue import WaitQueue
from balancer.router.shedding import RATE_WINDOW, ServiceTimes, estimate
from common.errors import ErrorCode, LlmlbError
from common.types import Capability
from tests.unit.router.conftest import FakeClock, eventually
from tests.unit.router.test_queue import NEVER_S, WAIT_S, Slots

CHAT: Key = ("org/tiny", Capability.CHAT)
FAR = 3600.0  # a deadline that never comes into play
SLOTS = 4  # calls the capable nodes take at once


def shedding_queue(clock: FakeClock, service: ServiceTimes, *, max_wait_s: float = 10.0) -> WaitQueue:
    return WaitQueue(
        queue_size=100,
        queue_timeout_s=30.0,
        max_wait_s=max_wait_s,
        service=service,
        clock=clock,
        serves=lambda key, node_id: True,
        recheck_s=NEVER_S,
    )


def slots() -> int:
    return SLOTS


async def queue_up(
    queue: WaitQueue, clock: FakeClock, count: int, deadline_s: float = FAR
) -> list[asyncio.Task[Candidate]]:
    """``count`` requests waiting in ``CHAT``'s queue, in order, none of which finds a node."""
    tasks = []
    for i in range(count):
        task = asyncio.create_task(
            queue.wait(CHAT, clock() + deadline_s, Slots().attempt_for(f"w{i}"), slots)
        )
        tasks.append(task)
        await eventually(lambda: queue.waiting == i + 1, f"waiter {i} queued")  # noqa: B023
    return tasks


async def cancelled(tasks: list[asyncio.Task[Candidate]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_the_expected_wait_is_the_queue_ahead_plus_one_times_the_service_time_over_the_slots():
    assert estimate(0, 2.0, 4) is not None and estimate(0, 2.0, 4).wait_s == pytest.approx(0.5)  # type: ignore[union-attr]
    assert estimate(7, 2.0, 4).wait_s == pytest.approx(4.0)  # type: ignore[union-attr]
    assert estimate(7, None, 4) is None  # no call finished yet: no estimate
    assert estimate(7, 2.0, 0) is None  # no capable node: nothing to wait for


async def test_a_request_expected_to_wait_past_the_max_wait_is_refused_at_once_with_that_wait(
    clock: FakeClock,
):
    service = ServiceTimes()
    service.finished(CHAT, 2.0)  # 4 slots, 2 s each: one frees every 0.5 s
    queue = shedding_queue(clock, service, max_wait_s=10.0)
    ahead = await queue_up(queue, clock, 19)  # the 20th waits 20 times 0.5 = 10 s: still queued
    twentieth = asyncio.create_task(queue.wait(CHAT, clock() + FAR, Slots().attempt_for("20th"), slots))
    await eventually(lambda: queue.waiting == 20, "the 20th queued")

    with pytest.raises(LlmlbError) as refused:  # the 21st would wait 10.5 s
        await queue.wait(CHAT, clock() + FAR, Slots().attempt_for("21st"), slots)

    assert refused.value.code is ErrorCode.QUEUE_FULL
    assert refused.value.retry_after_s == pytest.approx(10.5)
    assert refused.value.retry_after() == 11
    assert "expected wait of 10.5 s" in refused.value.message
    assert queue.waiting == 20  # the refused one never queued
    await cancelled([*ahead, twentieth])


async def test_a_request_whose_deadline_comes_before_the_wait_and_the_answer_is_refused_at_once(
    clock: FakeClock,
):
    service = ServiceTimes()
    service.finished(CHAT, 2.0)
    queue = shedding_queue(clock, service)
    ahead = await queue_up(queue, clock, 3)  # a fourth waits 2 s, then takes 2 s to answer

    with pytest.raises(LlmlbError) as refused:
        await queue.wait(CHAT, clock() + 3.9, Slots().attempt_for("short"), slots)
    in_time = asyncio.create_task(queue.wait(CHAT, clock() + 4.1, Slots().attempt_for("in time"), slots))
    await eventually(lambda: queue.waiting == 4, "the one with time enough queued")

    assert refused.value.code is ErrorCode.QUEUE_FULL
    assert refused.value.retry_after() == 2
    assert "deadline" in refused.value.message
    await cancelled([*ahead, in_time])


async def test_before_any_call_finished_nothing_is_shed_by_the_estimate(clock: FakeClock):
    queue = shedding_queue(clock, ServiceTimes(), max_wait_s=0.001)
    waiters = await queue_up(queue, clock, 5, deadline_s=0.5)

    assert queue.waiting == 5
    await cancelled(waiters)


async def test_a_queued_request_leaves_with_queue_full_once_slower_answers_put_its_turn_past_its_time(
    clock: FakeClock,
):
    service = ServiceTimes()
    service.finished(CHAT, 2.0)
    queue = shedding_queue(clock, service)
    first, second = await queue_up(queue, clock, 2, deadline_s=10.0)  # the second: 1 s wait, 2 s answer

    for _ in range(8):  # the nodes slowed down: the average is now 16.3 s (one call can raise it 30 %)
        service.finished(CHAT, 60.0)
    queue.wake(None)  # the first looks, finds no node, and sees it would wait 4.1 s, answer in 16.3 s
    with pytest.raises(LlmlbError) as left:
        await asyncio.wait_for(first, WAIT_S)

    assert left.value.code is ErrorCode.QUEUE_FULL
    assert left.value.retry_after() == 5
    assert queue.waiting == 1
    await cancelled([second])


async def test_a_waiter_woken_after_its_deadline_gets_timeout_and_never_a_node(clock: FakeClock):
    queue = shedding_queue(clock, ServiceTimes())
    slots_free = Slots()
    waiter = asyncio.create_task(queue.wait(CHAT, clock() + 2.0, slots_free.attempt_for("late"), slots))
    await eventually(lambda: queue.waiting == 1, "queued")

    clock.advance(2.0)  # its deadline passes while it waits...
    slots_free.free = 1  # ...and then a node frees up
    queue.wake("n1")

    with pytest.raises(LlmlbError) as timed_out:
        await asyncio.wait_for(waiter, WAIT_S)
    assert timed_out.value.code is ErrorCode.TIMEOUT
    assert slots_free.takers == []  # the free node was not taken for work nobody waits for
    assert slots_free.looks == 0


async def test_a_request_that_leaves_the_queue_no_longer_counts_against_later_arrivals(clock: FakeClock):
    service = ServiceTimes()
    service.finished(CHAT, 2.0)
    queue = shedding_queue(clock, service, max_wait_s=1.0)
    first = await queue_up(queue, clock, 1)  # a second would wait 1 s: the most it may
    second = asyncio.create_task(queue.wait(CHAT, clock() + FAR, Slots().attempt_for("second"), slots))
    await eventually(lambda: queue.waiting == 2, "the second queued")
    with pytest.raises(LlmlbError):
        await queue.wait(CHAT, clock() + FAR, Slots().attempt_for("third"), slots)

    await cancelled(first)  # its caller went away
    await eventually(lambda: queue.waiting == 1, "the first left the queue")
    third = asyncio.create_task(queue.wait(CHAT, clock() + FAR, Slots().attempt_for("third"), slots))
    await eventually(lambda: queue.waiting == 2, "the third queued in the first's place")

    await cancelled([second, third])


def test_the_service_time_is_a_moving_average_of_finished_calls():
    service = ServiceTimes()
    assert service.of(CHAT) is None
    service.finished(CHAT, 1.0)
    assert service.of(CHAT) == 1.0
    service.finished(CHAT, 1.5)
    assert service.of(CHAT) == pytest.approx(1.15)  # 1 + 0.3 * (1.5 - 1)
    service.finished(CHAT, 0.15)
    assert service.of(CHAT) == pytest.approx(0.85)  # 1.15 + 0.3 * (0.15 - 1.15)
    assert service.of(("org/other", Capability.CHAT)) is None


def test_one_stalled_call_raises_the_service_time_by_at_most_a_third_and_a_slowdown_is_followed():
    service = ServiceTimes()
    for _ in range(10):
        service.finished(CHAT, 0.018)
    service.finished(CHAT, 1.0)  # one call held 55 times as long: a pause, not the nodes' pace
    assert service.of(CHAT) == pytest.approx(0.018 * 1.3)
    for _ in range(10):
        service.finished(CHAT, 0.018)
    assert service.of(CHAT) == pytest.approx(0.018, rel=0.01)

    for _ in range(16):  # the nodes really became ten times slower
        service.finished(CHAT, 0.18)
    assert service.of(CHAT) == pytest.approx(0.18, rel=0.1)


def test_a_pause_every_call_in_flight_shared_does_not_refuse_the_queue_behind_it(clock: FakeClock):
    # 4 slots of 18 ms calls: 222 calls a second. Then the nodes' process pauses 1.5 s: the 4 calls in
    # flight, and the next 12 the paused process catches up on, each took 1.5 s longer than it should.
    service = ServiceTimes(clock)
    for _ in range(RATE_WINDOW):
        clock.advance(0.018 / SLOTS)
        service.finished(CHAT, 0.018)
    clock.advance(1.5)
    for _ in range(16):
        clock.advance(0.018 / SLOTS)
        service.finished(CHAT, 1.5)
    ahead = 196  # 200 clients, 4 of them in flight
    by_service_alone = estimate(ahead, service.of(CHAT), SLOTS)
    assert by_service_alone is not None and by_service_alone.wait_s > 15.0  # what refused them
    expected = estimate(ahead, service.of(CHAT), SLOTS, service.rate(CHAT))
    # The last 32 calls ended within the pause and 4.5 ms each side: about 20 a second, 10 s to wait.
    assert expected is not None and expected.wait_s == pytest.approx((ahead + 1) * (1.5 + 31 * 0.0045) / 31)
    for _ in range(RATE_WINDOW):  # the calls after it end at the old pace again
        clock.advance(0.018 / SLOTS)
        service.finished(CHAT, 0.018)
    expected = estimate(ahead, service.of(CHAT), SLOTS, service.rate(CHAT))
    assert expected is not None and expected.wait_s == pytest.approx((ahead + 1) * 0.018 / SLOTS)


def test_the_observed_rate_needs_a_full_window_and_only_ever_shortens_the_wait(clock: FakeClock):
    service = ServiceTimes(clock)
    for _ in range(RATE_WINDOW - 1):
        clock.advance(1.0)
        service.finished(CHAT, 2.0)
    assert service.rate(CHAT) is None  # too few calls to tell a rate
    clock.advance(1.0)
    service.finished(CHAT, 2.0)
    assert service.rate(CHAT) == pytest.approx(1.0)
    # Traffic was light (one call a second) while 4 slots could end 2 a second: the slots win.
    assert estimate(7, 2.0, SLOTS, service.rate(CHAT)).wait_s == pytest.approx(4.0)  # type: ignore[union-attr]
    assert estimate(7, 2.0, SLOTS, 8.0).wait_s == pytest.approx(1.0)  # type: ignore[union-attr]


def test_an_average_of_no_time_at_all_still_grows():
    service = ServiceTimes()
    service.finished(CHAT, 0.0)
    for _ in range(40):
        service.finished(CHAT, 0.5)
    assert service.of(CHAT) == pytest.approx(0.5, rel=0.01)


def no_slots() -> int:
    return 0  # no node ready yet: a cold start


@pytest.mark.parametrize("ready_in", [None, 4.0])
async def test_a_cold_start_is_not_refused_for_want_of_a_ready_node_and_waits_its_placement_estimate(
    clock: FakeClock, ready_in: float | None
):
    service = ServiceTimes()
    service.finished(CHAT, 2.0)  # answers known from before the model was scaled to zero
    queue = shedding_queue(clock, service, max_wait_s=5.0)
    slots = Slots()
    waiter = asyncio.create_task(
        queue.wait(CHAT, clock() + FAR, slots.attempt_for("cold"), no_slots, lambda: ready_in)
    )
    await eventually(lambda: queue.waiting == 1, "queued for the copy being placed")
    slots.free = 1  # the copy is ready
    queue.wake(None)
    assert (await asyncio.wait_for(waiter, WAIT_S)).node_id == "n1"


async def test_a_cold_start_whose_placement_estimate_exceeds_the_max_wait_is_refused_at_once(
    clock: FakeClock,
):
    queue = shedding_queue(clock, ServiceTimes(), max_wait_s=5.0)

    with pytest.raises(LlmlbError) as refused:
        await queue.wait(CHAT, clock() + FAR, Slots().attempt_for("cold"), no_slots, lambda: 12.0)

    assert refused.value.code is ErrorCode.QUEUE_FULL
    assert refused.value.retry_after_s == pytest.approx(12.0)
    assert queue.waiting == 0
