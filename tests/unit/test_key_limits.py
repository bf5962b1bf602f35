"""The per-key limits rule (``balancer.edge.limits``) without sockets: an injected clock, and the totals
every replica counted given by a small fake that speaks ``UsageCounter.totals``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from balancer.edge.limits import KeyLimiter, KeyState
from common.errors import ErrorCode, LlmlbError
from common.types import ApiKey, KeyLimits, Scope

T0 = datetime(2026, 3, 31, 23, 58, 30, tzinfo=UTC)  # 30 s before a minute ends, 90 s before a day and a month


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


class StoreTotals:
    """What the store holds per key from each window start on: (requests, tokens) by the minute."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[datetime, int, int]]] = {}
        self.reads = 0

    def add(self, key_id: str, minute: datetime, requests: int, tokens: int) -> None:
        self.rows.setdefault(key_id, []).append((minute, requests, tokens))

    async def flush(self) -> int:
        return 0

    async def totals(
        self,
        key_ids: Sequence[str],
        starts: Sequence[datetime],
        then: Callable[[list[dict[str, tuple[int, int]]]], None],
    ) -> None:
        self.reads += 1
        found = []
        for start in starts:
            window: dict[str, tuple[int, int]] = {}
            for key_id in key_ids:
                rows = [(r, t) for m, r, t in self.rows.get(key_id, []) if m >= start]
                if rows:
                    window[key_id] = (sum(r for r, _ in rows), sum(t for _, t in rows))
            found.append(window)
        then(found)


@dataclass
class Ended:
    limited: KeyState | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def key(**limits: object) -> ApiKey:
    return ApiKey("key-1", "app", "llmlb-abc", "hash", (Scope.API,), limits=KeyLimits(**limits))  # type: ignore[arg-type]


async def refused(limiter: KeyLimiter, k: ApiKey) -> LlmlbError:
    with pytest.raises(LlmlbError) as caught:
        await limiter.admit(k)
    return caught.value


def headers(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return dict(pairs)


async def test_requests_per_minute_are_refused_once_reached_and_open_again_the_next_minute() -> None:
    clock = Clock(T0)
    limiter = KeyLimiter(StoreTotals(), clock=clock)
    k = key(rpm=2)
    first, sent = await limiter.admit(k)
    assert headers(sent) == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",
    }
    limiter.finished(Ended(first), "ok", 0.1)
    await limiter.admit(k)
    error = await refused(limiter, k)
    assert error.code is ErrorCode.RATE_LIMIT_EXCEEDED and error.spec.http_status == 429
    assert error.to_openai()["error"]["type"] == "rate_limit_exceeded"
    assert error.retry_after() == 30
    assert headers(error.headers)["x-ratelimit-remaining-requests"] == "0"

    clock.at = T0 + timedelta(seconds=31)  # the next minute
    _, sent = await limiter.admit(k)
    assert headers(sent)["x-ratelimit-remaining-requests"] == "1"


async def test_tokens_count_when_a_request_ends_so_one_in_flight_finishes_and_the_next_is_refused() -> None:
    clock = Clock(T0)
    limiter = KeyLimiter(StoreTotals(), clock=clock)
    k = key(daily_tokens=100)
    a, _ = await limiter.admit(k)
    b, _ = await limiter.admit(k)  # both start with the whole budget left
    limiter.finished(Ended(a, prompt_tokens=50, completion_tokens=30), "ok", 0.1)
    limiter.finished(Ended(b, prompt_tokens=40, completion_tokens=10), "ok", 0.1)  # 130 of 100: it finished
    error = await refused(limiter, k)
    assert error.code is ErrorCode.INSUFFICIENT_QUOTA and error.spec.http_status == 429
    assert error.to_openai()["error"]["type"] == "insufficient_quota"
    assert error.retry_after() == 90  # until midnight UTC
    assert headers(error.headers) == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m30s",
    }
    clock.at = T0 + timedelta(seconds=91)  # a new day
    await limiter.admit(k)


async def test_tokens_per_minute_and_a_monthly_budget_count_alike() -> None:
    clock = Clock(T0)
    limiter = KeyLimiter(StoreTotals(), clock=clock)
    k = key(tpm=10, monthly_tokens=25)
    s, _ = await limiter.admit(k)
    limiter.finished(Ended(s, prompt_tokens=6, completion_tokens=6), "ok", 0.1)
    assert (await refused(limiter, k)).code is ErrorCode.RATE_LIMIT_EXCEEDED
    clock.at = T0 + timedelta(seconds=30)  # next minute, same month
    s, sent = await limiter.admit(k)
    assert headers(sent)["x-ratelimit-remaining-tokens"] == "10"
    limiter.finished(Ended(s, prompt_tokens=9), "ok", 0.1)
    clock.at = T0 + timedelta(seconds=60)
    s, _ = await limiter.admit(k)
    limiter.finished(Ended(s, completion_tokens=5), "ok", 0.1)  # 26 of 25 this month
    clock.at = T0 + timedelta(seconds=75)
    error = await refused(limiter, k)
    assert error.code is ErrorCode.INSUFFICIENT_QUOTA and "month" in error.message
    clock.at = T0 + timedelta(seconds=91)  # April
    await limiter.admit(k)


async def test_requests_in_flight_are_capped_and_a_slot_frees_when_one_ends() -> None:
    limiter = KeyLimiter(StoreTotals(), clock=Clock(T0))
    k = key(max_parallel=2)
    one, sent = await limiter.admit(k)
    assert sent == ()  # no per-minute limit: no x-ratelimit headers to give
    await limiter.admit(k)
    error = await refused(limiter, k)
    assert error.code is ErrorCode.RATE_LIMIT_EXCEEDED and error.retry_after() == 1
    limiter.finished(Ended(one), "ok", 0.1)
    await limiter.admit(k)


async def test_counts_of_every_replica_are_read_once_on_first_use_and_again_on_each_sync() -> None:
    store = StoreTotals()
    clock = Clock(T0)
    limiter = KeyLimiter(store, clock=clock)
    k = key(rpm=5, daily_tokens=1000)
    minute = T0.replace(second=0)
    store.add(k.id, minute, requests=3, tokens=400)  # what other replicas counted this minute
    store.add(k.id, minute - timedelta(hours=1), requests=9, tokens=500)  # earlier today
    _, sent = await limiter.admit(k)
    assert store.reads == 1
    assert headers(sent)["x-ratelimit-remaining-requests"] == "1"  # 3 there and this one
    state, _ = await limiter.admit(k)
    assert (await refused(limiter, k)).code is ErrorCode.RATE_LIMIT_EXCEEDED
    assert store.reads == 1  # the request path reads the store only for a key never seen

    # Another replica spends the rest of the day's budget; the next sync brings it here.
    store.add(k.id, minute, requests=0, tokens=200)
    clock.at = T0 + timedelta(seconds=40)
    await limiter.sync()
    assert store.reads == 2
    assert (await refused(limiter, k)).code is ErrorCode.INSUFFICIENT_QUOTA
    assert state is not None and state.in_flight == 2


async def test_a_key_without_limits_passes_untouched_and_a_model_list_hides_other_models() -> None:
    store = StoreTotals()
    limiter = KeyLimiter(store, clock=Clock(T0))
    assert await limiter.admit(key()) == (None, ())
    assert await limiter.admit(None) == (None, ())
    assert store.reads == 0
    limiter.check_model(key(), "any/model")
    limiter.check_model(key(models=("org/a",)), "org/a")
    with pytest.raises(LlmlbError) as caught:
        limiter.check_model(key(models=("org/a",)), "org/b")
    assert (
        caught.value.code is ErrorCode.MODEL_NOT_FOUND and caught.value.message == "model 'org/b' not found"
    )


async def test_a_key_idle_for_a_while_is_no_longer_synced_and_is_read_anew_on_its_next_request() -> None:
    store = StoreTotals()
    clock = Clock(T0)
    limiter = KeyLimiter(store, clock=clock)
    k = key(rpm=5)
    state, _ = await limiter.admit(k)
    limiter.finished(Ended(state), "ok", 0.1)
    await limiter.sync()
    assert store.reads == 2
    clock.at = T0 + timedelta(minutes=11)
    await limiter.sync()
    assert store.reads == 2  # nothing to read for
    store.add(k.id, clock.at.replace(second=0), requests=5, tokens=0)
    assert (await refused(limiter, k)).code is ErrorCode.RATE_LIMIT_EXCEEDED
    assert store.reads == 3
