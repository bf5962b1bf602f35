"""The queue in front of busy nodes: arrival order, a bounded size, and a time limit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from balancer.router.candidates import READY, Candidate, Key
from balancer.router.queue import WaitQueue
from common.errors import ErrorCode, LlmlbError
from common.types import Capability
from tests.unit.router.conftest import FakeClock, eventually

CHAT: Key = ("org/tiny", Capability.CHAT)
EMBED: Key = ("org/other", Capability.EMBEDDING)
FAR = 3600.0  # a caller's deadline that never comes into play
WAIT_S = 5.0  # real seconds a test waits for a task it expects to finish
NEVER_S = 3600.0  # waiters look again only when woken, so each test decides who looks when


class Slots:
    """Free places on a node, taken by whichever waiter looks first; remembers who took them."""

    def __init__(self) -> None:
        self.free = 0
        self.takers: list[str] = []
        self.looks = 0  # attempts made, taken or not

    def attempt_for(self, who: str) -> Callable[[], Candidate | None]:
        def attempt() -> Candidate | None:
            self.looks += 1
            if self.free == 0:
                return None
            self.free -= 1
            self.takers.append(who)
            return Candidate("n1", "127.0.0.1:1", READY)

        return attempt


def wait_queue(
    clock: FakeClock, *, queue_size: int = 10, serves: Callable[[Key, str], bool] | None = None
) -> WaitQueue:
    return WaitQueue(
        queue_size=queue_size,
        queue_timeout_s=30.0,
        clock=clock,
        serves=serves or (lambda key, node_id: True),
        recheck_s=NEVER_S,
    )


async def test_freed_slots_go_to_waiters_in_arrival_order(clock: FakeClock):
    queue = wait_queue(clock)
    slots = Slots()
    waiters = []
    for who in ("first", "second", "third"):
        queued = queue.waiting
        waiters.append(asyncio.create_task(queue.wait(CHAT, clock() + FAR, slots.attempt_for(who))))
        await eventually(lambda: queue.waiting > queued, f"{who} queued")  # noqa: B023

    for _ in range(3):
        taken = len(slots.takers)
        slots.free += 1
        queue.wake("n1")
        await eventually(lambda: len(slots.takers) > taken, "the slot taken")  # noqa: B023

    await asyncio.wait_for(asyncio.gather(*waiters), WAIT_S)
    assert slots.takers == ["first", "second", "third"]
    assert queue.waiting == 0


async def test_a_freed_node_wakes_a_waiter_it_can_serve_not_merely_the_oldest(clock: FakeClock):
    queue = wait_queue(clock, serves=lambda key, node_id: (key, node_id) == (EMBED, "embedder"))
    chat_slots, embed_slots = Slots(), Slots()
    chat = asyncio.create_task(queue.wait(CHAT, clock() + FAR, chat_slots.attempt_for("chat")))
    await eventually(lambda: queue.waiting == 1, "chat queued")
    embed = asyncio.create_task(queue.wait(EMBED, clock() + FAR, embed_slots.attempt_for("embed")))
    await eventually(lambda: queue.waiting == 2, "embed queued")

    embed_slots.free = 1
    chat_slots.free = 1  # free too, but the chat waiter is not woken: the freed node cannot serve it
    queue.wake("embedder")
    await eventually(lambda: embed.done(), "embed served")

    assert embed_slots.takers == ["embed"]
    assert not chat.done()
    chat.cancel()
    with pytest.raises(asyncio.CancelledError):
        await chat
    assert queue.waiting == 0


async def test_a_full_queue_refuses_at_once_with_queue_full_and_retry_after(clock: FakeClock):
    queue = wait_queue(clock, queue_size=1)
    waiter = asyncio.create_task(queue.wait(CHAT, clock() + FAR, Slots().attempt_for("waiter")))
    await eventually(lambda: queue.waiting == 1, "one queued")

    with pytest.raises(LlmlbError) as refused:
        await queue.wait(CHAT, clock() + FAR, Slots().attempt_for("late"))

    assert refused.value.code is ErrorCode.QUEUE_FULL
    assert refused.value.retry_after_s == 1.0
    assert queue.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


@pytest.mark.parametrize(("deadline_s", "waited_s"), [(FAR, 30.0), (2.0, 2.0)])
async def test_a_request_waiting_past_its_time_gets_timeout(
    clock: FakeClock, deadline_s: float, waited_s: float
):
    queue = wait_queue(clock)  # queue timeout 30 s; the caller's own deadline wins when sooner
    slots = Slots()
    waiter = asyncio.create_task(queue.wait(CHAT, clock() + deadline_s, slots.attempt_for("waiter")))
    await eventually(lambda: queue.waiting == 1, "one queued")

    clock.advance(waited_s - 0.01)
    queue.wake(None)  # it looks again: still in time, still no node
    await eventually(lambda: slots.looks == 1, "looked again")
    assert not waiter.done()
    clock.advance(0.01)
    queue.wake(None)

    with pytest.raises(LlmlbError) as timed_out:
        await asyncio.wait_for(waiter, WAIT_S)
    assert timed_out.value.code is ErrorCode.TIMEOUT
    assert queue.waiting == 0


async def test_a_woken_waiter_that_finds_the_slot_taken_keeps_its_place_at_the_front(clock: FakeClock):
    queue = wait_queue(clock)
    slots = Slots()
    first = asyncio.create_task(queue.wait(CHAT, clock() + FAR, slots.attempt_for("first")))
    await eventually(lambda: queue.waiting == 1, "first queued")
    second = asyncio.create_task(queue.wait(CHAT, clock() + FAR, slots.attempt_for("second")))
    await eventually(lambda: queue.waiting == 2, "second queued")

    queue.wake("n1")  # a slot freed, but a new arrival took it before the first waiter looked
    await eventually(lambda: slots.looks == 1, "the first waiter looked")
    slots.free = 1
    queue.wake("n1")

    await asyncio.wait_for(first, WAIT_S)
    assert slots.takers == ["first"]
    assert queue.waiting == 1
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert queue.waiting == 0


async def test_a_woken_waiter_stays_queued_when_the_others_left_meanwhile(clock: FakeClock):
    queue = wait_queue(clock)
    slots = Slots()
    stays = asyncio.create_task(queue.wait(CHAT, clock() + FAR, slots.attempt_for("stays")))
    await eventually(lambda: queue.waiting == 1, "first queued")
    leaves = asyncio.create_task(queue.wait(CHAT, clock() + FAR, slots.attempt_for("leaves")))
    await eventually(lambda: queue.waiting == 2, "second queued")

    queue.wake("n1")  # no free slot: it will look, find none and queue again...
    leaves.cancel()  # ...after the only other waiter has left and emptied the queue
    with pytest.raises(asyncio.CancelledError):
        await leaves
    await eventually(lambda: slots.looks == 1, "the woken waiter looked")
    slots.free = 1
    queue.wake("n1")

    await asyncio.wait_for(stays, WAIT_S)
    assert slots.takers == ["stays"]
    assert queue.waiting == 0
