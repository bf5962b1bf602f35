"""Per-key limits and budgets (``common.types.KeyLimits``): the one place both doors apply them.

A request of a key with limits is admitted when the key has requests and tokens left in the current
UTC minute, a slot under its ``max_parallel``, and tokens left in its daily and monthly budgets;
otherwise it is refused with 429 (``rate_limit_exceeded`` for the per-minute limits and in-flight
slots, ``insufficient_quota`` for a spent budget) and a ``Retry-After`` until the window ends. A
request in flight when a budget runs out finishes: tokens are known only once an answer ends, so they
are counted then, and a later request is refused. A model outside the key's list is ``model_not_found``.

Counts across replicas come from the usage the store already holds (``balancer.usage``: requests and
prompt plus completion tokens per key, model and minute). Every ``sync_s`` each replica flushes its own
usage and reads the totals of its limited keys for the current minute, day and month; between two
reads it adds what it admitted and counted itself. So each replica may overshoot a limit by what the
key's other replicas admitted since their last flush (at most ``sync_s`` ago while they serve limited
keys) plus the requests still in flight there. ``max_parallel`` is counted by each replica alone: with
N replicas a key may hold up to N times its slots.

Cost: a key without limits pays one attribute read; a limited key a few dict operations, no I/O
(except its first request on a replica, which reads its totals once).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from common.errors import ErrorCode, LlmlbError
from common.types import ApiKey, KeyLimits

log = structlog.get_logger(__name__)

SYNC_S = 1.0
IDLE = timedelta(minutes=10)  # a key unused this long is no longer synced; its next request reads anew
NEVER = datetime.min.replace(tzinfo=UTC)
ONE_MINUTE = timedelta(minutes=1)
ONE_DAY = timedelta(days=1)
Headers = tuple[tuple[str, str], ...]
_Totals = dict[str, tuple[int, int]]  # key id -> (requests, tokens)


class Totals(Protocol):
    """Where the counts of every replica are read (``balancer.usage.UsageCounter``)."""

    async def flush(self) -> int: ...

    async def totals(
        self, key_ids: Sequence[str], starts: Sequence[datetime], then: Callable[[list[_Totals]], None]
    ) -> None: ...


class Ended(Protocol):
    """What the limiter reads of a request that ended (``balancer.edge.observe.ObservedCall``)."""

    limited: KeyState | None
    prompt_tokens: int
    completion_tokens: int


def minute_start(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def day_start(at: datetime) -> datetime:
    return at.replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(at: datetime) -> datetime:
    return day_start(at).replace(day=1)


def next_month(at: datetime) -> datetime:
    start = month_start(at)
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )


def _reset(seconds: float) -> str:
    """A wait as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``1s``, ``6m0s``, ``2h3m0s``."""
    whole = max(1, math.ceil(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True, slots=True)
class Windows:
    """The UTC minute, day and month holding one moment, and when each ends."""

    minute: datetime
    day: datetime
    month: datetime
    minute_end: datetime
    day_end: datetime
    month_end: datetime

    @classmethod
    def at(cls, now: datetime) -> Windows:
        minute, day = minute_start(now), day_start(now)
        return cls(minute, day, month_start(now), minute + ONE_MINUTE, day + ONE_DAY, next_month(now))


@dataclass(slots=True)
class KeyState:
    """One limited key on this replica: the totals last read from the store, and what came since."""

    key_id: str
    read: bool = False  # whether the totals were ever read
    minute: datetime = NEVER  # the windows the totals were read for
    requests: int = 0  # requests counted in ``minute`` (every replica), and those in flight here then
    tokens_minute: int = 0
    tokens_day: int = 0
    tokens_month: int = 0
    in_flight: int = 0
    used: datetime = NEVER  # when this replica last admitted one of its requests
    started: dict[datetime, int] = field(default_factory=dict)  # minute -> requests admitted since the read
    spent: dict[datetime, int] = field(default_factory=dict)  # minute -> tokens counted since the read

    def used_requests(self, w: Windows) -> int:
        return (self.requests if self.minute == w.minute else 0) + self.started.get(w.minute, 0)

    def used_tokens(self, w: Windows, start: datetime) -> int:
        """Tokens counted from ``start`` (one of ``w``'s window starts) on; the totals read count if
        they were read within that window (``minute`` is never later than now)."""
        if self.minute < start:
            read = 0
        elif start == w.minute:
            read = self.tokens_minute
        else:
            read = self.tokens_day if start == w.day else self.tokens_month
        return read + sum(n for m, n in self.spent.items() if m >= start)

    def apply(self, minute: datetime, found: list[_Totals]) -> None:
        """The totals read for the windows holding ``minute``; what was counted here since is in them."""
        in_minute, in_day, in_month = (f.get(self.key_id, (0, 0)) for f in found)
        self.read = True
        self.minute = minute
        self.requests = in_minute[0] + self.in_flight  # in flight: not in usage until they end
        self.tokens_minute, self.tokens_day, self.tokens_month = in_minute[1], in_day[1], in_month[1]
        self.started.clear()
        self.spent.clear()


class KeyLimiter:
    """Admits the requests of keys with limits, counts them, and names their rate-limit headers."""

    def __init__(
        self,
        totals: Totals,
        *,
        sync_s: float = SYNC_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._totals = totals
        self._sync_s = sync_s
        self.clock = clock  # wall-clock UTC: windows are UTC minutes, days and months
        self._keys: dict[str, KeyState] = {}
        self._last = Windows.at(NEVER)
        self._task: asyncio.Task[None] | None = None
        self._syncing = asyncio.Lock()

    def check_model(self, key: ApiKey | None, model: str) -> None:
        """``model_not_found`` for a model outside the key's list, worded as for a model nobody has."""
        if key is not None and key.limits.models and model not in key.limits.models:
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} not found")

    async def admit(self, key: ApiKey | None, model: str | None = None) -> tuple[KeyState | None, Headers]:
        """Takes a slot for one request of ``key`` (for ``model``, when given: ``check_model``), or
        refuses it (429 with headers and Retry-After).

        Returns the key's state (to hand back to ``finished``) and the rate-limit headers of the answer;
        (None, ()) for a key without limits.
        """
        if model is not None:
            self.check_model(key, model)
        if key is None or not key.limits.any:
            return None, ()
        state = self._keys.get(key.id)
        if state is None:
            state = self._keys[key.id] = KeyState(key.id)
        if not state.read:
            try:
                await self._sync([state])
            except Exception as exc:  # the store is down: count from here, read again on the next sync
                state.read = True
                log.warning("limits.read_failed", key_id=key.id, error=repr(exc))
        now = self.clock()
        w = self._windows(now)
        refusal = self._refusal(key.limits, state, now, w)
        if refusal is not None:
            code, message, wait = refusal
            headers = self.headers(key.limits, state, now, w)
            raise LlmlbError(code, message, retry_after_s=wait, headers=headers)
        state.in_flight += 1
        state.used = now
        state.started[w.minute] = state.started.get(w.minute, 0) + 1
        return state, self.headers(key.limits, state, now, w)

    def _windows(self, now: datetime) -> Windows:
        """The windows holding ``now``, computed once a minute (the request path's costliest part)."""
        w = self._last
        if not w.minute <= now < w.minute_end:
            w = self._last = Windows.at(now)
        return w

    def _refusal(
        self, limits: KeyLimits, state: KeyState, now: datetime, w: Windows
    ) -> tuple[ErrorCode, str, float] | None:
        """Why ``limits`` refuse a request now, and the seconds until that lifts; None to admit it.

        The longest wait is named first: a spent month is not lifted by the next minute.
        """
        if limits.monthly_tokens and state.used_tokens(w, w.month) >= limits.monthly_tokens:
            message = f"this key's budget of {limits.monthly_tokens} tokens a month (UTC) is spent"
            return ErrorCode.INSUFFICIENT_QUOTA, message, (w.month_end - now).total_seconds()
        if limits.daily_tokens and state.used_tokens(w, w.day) >= limits.daily_tokens:
            message = f"this key's budget of {limits.daily_tokens} tokens a day (UTC) is spent"
            return ErrorCode.INSUFFICIENT_QUOTA, message, (w.day_end - now).total_seconds()
        if limits.rpm and state.used_requests(w) >= limits.rpm:
            message = f"this key's limit of {limits.rpm} requests per minute is reached"
            return ErrorCode.RATE_LIMIT_EXCEEDED, message, (w.minute_end - now).total_seconds()
        if limits.tpm and state.used_tokens(w, w.minute) >= limits.tpm:
            message = f"this key's limit of {limits.tpm} tokens per minute is reached"
            return ErrorCode.RATE_LIMIT_EXCEEDED, message, (w.minute_end - now).total_seconds()
        if limits.max_parallel and state.in_flight >= limits.max_parallel:
            message = (
                f"this key may have {limits.max_parallel} requests in flight at once; wait for one to end"
            )
            return ErrorCode.RATE_LIMIT_EXCEEDED, message, 1.0
        return None

    def headers(self, limits: KeyLimits, state: KeyState, now: datetime, w: Windows) -> Headers:
        """OpenAI's ``x-ratelimit-*`` headers: requests per minute, and the key's tightest token limit."""
        out: list[tuple[str, str]] = []
        if limits.rpm:
            out += [
                ("x-ratelimit-limit-requests", str(limits.rpm)),
                ("x-ratelimit-remaining-requests", str(max(0, limits.rpm - state.used_requests(w)))),
                ("x-ratelimit-reset-requests", _reset((w.minute_end - now).total_seconds())),
            ]
        tokens: tuple[int, datetime, datetime] | None = None
        if limits.tpm:
            tokens = (limits.tpm, w.minute, w.minute_end)
        elif limits.daily_tokens:
            tokens = (limits.daily_tokens, w.day, w.day_end)
        elif limits.monthly_tokens:
            tokens = (limits.monthly_tokens, w.month, w.month_end)
        if tokens is not None:
            limit, start, end = tokens
            out += [
                ("x-ratelimit-limit-tokens", str(limit)),
                ("x-ratelimit-remaining-tokens", str(max(0, limit - state.used_tokens(w, start)))),
                ("x-ratelimit-reset-tokens", _reset((end - now).total_seconds())),
            ]
        return tuple(out)

    def finished(self, call: Ended, code: str, elapsed_s: float) -> None:
        """The edge's hook when a request ends: frees its slot and counts its tokens (no I/O)."""
        state = call.limited
        if state is None:
            return
        call.limited = None
        state.in_flight = max(0, state.in_flight - 1)
        tokens = call.prompt_tokens + call.completion_tokens
        if tokens:
            minute = self._windows(self.clock()).minute
            state.spent[minute] = state.spent.get(minute, 0) + tokens

    async def sync(self) -> None:
        """Flushes this replica's usage and reads every replica's totals of the keys limited here."""
        now = self.clock()
        for key_id in [k for k, s in self._keys.items() if not s.in_flight and now - s.used > IDLE]:
            del self._keys[key_id]
        if self._keys:
            await self._totals.flush()
            await self._sync(list(self._keys.values()))

    async def _sync(self, states: list[KeyState]) -> None:
        async with self._syncing:
            now = self.clock()
            minute = minute_start(now)

            def then(found: list[_Totals]) -> None:
                # Run with the totals, before anything else counts: nothing falls between the two.
                for state in states:
                    state.apply(minute, found)

            await self._totals.totals(
                [s.key_id for s in states], [minute, day_start(now), month_start(now)], then
            )

    def start(self) -> None:
        """Starts the periodic sync."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="key-limits-sync")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._sync_s)
            try:
                await self.sync()
            except Exception as exc:  # the store may be down: keep the last totals and counting here
                log.warning("limits.sync_failed", keys=len(self._keys), error=repr(exc))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
