"""Usage per key and model: counted in memory, written in batches, kept on a failed write, flushed on stop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from balancer.store import Store
from balancer.usage import UsageCounter, minute_of
from common.types import UsageCount

T0 = datetime(2026, 11, 30, 12, 0, 30, tzinfo=UTC)


@dataclass
class Finished:
    key_id: str = "key-a"
    model: str = "m"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'llmlb.db'}")
    yield opened
    await opened.close()


async def test_requests_are_summed_per_key_model_and_minute_and_written_in_one_flush(store: Store) -> None:
    clock = Clock()
    usage = UsageCounter(store, clock=clock)
    usage.finished(Finished(prompt_tokens=5, completion_tokens=7), "ok", 0.1)
    usage.finished(Finished(prompt_tokens=1, completion_tokens=2), "timeout", 0.1)
    usage.finished(Finished(key_id="key-b"), "ok", 0.1)
    usage.finished(Finished(model=""), "model_not_found", 0.1)  # no known model: not counted
    clock.now += timedelta(minutes=1)
    usage.finished(Finished(), "ok", 0.1)

    assert await store.usage(T0) == []  # nothing written on the request path
    assert await usage.flush() == 3
    minute = minute_of(T0)
    assert await store.usage(T0 - timedelta(hours=1)) == [
        UsageCount("key-a", "m", minute, 2, 1, 6, 9),
        UsageCount("key-a", "m", minute + timedelta(minutes=1), 1, 0, 0, 0),
        UsageCount("key-b", "m", minute, 1, 0, 0, 0),
    ]


async def test_answers_include_counts_not_yet_written_and_filter_by_key_and_model(store: Store) -> None:
    usage = UsageCounter(store, clock=Clock())
    usage.finished(Finished(completion_tokens=3), "ok", 0.1)
    await usage.flush()
    usage.finished(Finished(completion_tokens=4), "ok", 0.1)
    usage.finished(Finished(key_id="key-b", model="other"), "ok", 0.1)

    assert await usage.usage(T0, key_id="key-a") == [UsageCount("key-a", "m", minute_of(T0), 2, 0, 0, 7)]
    assert [c.key_id for c in await usage.usage(T0, model="other")] == ["key-b"]
    assert await usage.usage(T0 + timedelta(minutes=5)) == []


async def test_counts_are_kept_when_the_store_refuses_the_write(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'llmlb.db'}")
    usage = UsageCounter(store, clock=Clock())
    usage.finished(Finished(prompt_tokens=2), "ok", 0.1)
    await store.close()
    assert await usage.flush() == 0
    usage.finished(Finished(prompt_tokens=3), "ok", 0.1)
    assert usage.pending() == [UsageCount("key-a", "m", minute_of(T0), 2, 0, 5, 0)]


async def test_a_stop_writes_what_is_left_and_later_flushes_add_to_the_stored_rows(store: Store) -> None:
    usage = UsageCounter(store, clock=Clock(), flush_s=3600)
    usage.start()
    usage.finished(Finished(prompt_tokens=2), "ok", 0.1)
    await usage.flush()
    usage.finished(Finished(prompt_tokens=3), "ok", 0.1)
    await usage.stop()
    assert usage.pending() == []
    assert await store.usage(T0) == [UsageCount("key-a", "m", minute_of(T0), 2, 0, 5, 0)]


async def test_totals_for_limits_add_stored_and_pending_counts_per_window_once_each(store: Store) -> None:
    clock = Clock()
    usage = UsageCounter(store, clock=clock)
    usage.finished(Finished(prompt_tokens=5, completion_tokens=5), "ok", 0.1)
    await usage.flush()  # stored
    clock.now += timedelta(minutes=1)
    usage.finished(Finished(model="other", prompt_tokens=1, completion_tokens=2), "ok", 0.1)  # pending
    usage.finished(Finished(key_id="key-b", prompt_tokens=100), "ok", 0.1)  # another key
    seen: list[list[dict[str, tuple[int, int]]]] = []
    await usage.totals(["key-a"], [minute_of(clock.now), minute_of(T0)], seen.append)
    assert seen == [[{"key-a": (1, 3)}, {"key-a": (2, 13)}]]
    await usage.flush()  # the pending counts move to the store: the totals stay the same
    await usage.totals(["key-a"], [minute_of(clock.now), minute_of(T0)], seen.append)
    assert seen[1] == seen[0]
