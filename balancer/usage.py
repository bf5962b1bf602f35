"""Usage per API key per model per minute: counted in memory at the edge, written to the store in batches.

Counting costs a dict update on the request path; the store sees one batched write every
``flush_s`` seconds from a background task, never one per request. A failed write keeps the counts
for the next flush, and ``stop`` flushes what is left, so a graceful stop loses nothing counted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from balancer.store import Store
from common.types import UsageCount

log = structlog.get_logger(__name__)
FLUSH_S = 5.0

_Slot = tuple[str, str, datetime]  # (key id, model, minute)


class FinishedCall(Protocol):
    """What usage reads of a finished request (``balancer.edge.observe.ObservedCall``)."""

    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int


def minute_of(at: datetime) -> datetime:
    """The start of the UTC minute holding ``at``."""
    return at.astimezone(UTC).replace(second=0, microsecond=0)


def merged(counts: Sequence[UsageCount]) -> list[UsageCount]:
    """``counts`` with the rows of one (key, model, minute) added together, in key, model, minute order."""
    total: dict[_Slot, list[int]] = {}
    for c in counts:
        n = total.setdefault((c.key_id, c.model, c.minute), [0, 0, 0, 0])
        n[0] += c.requests
        n[1] += c.errors
        n[2] += c.prompt_tokens
        n[3] += c.completion_tokens
    return [UsageCount(k, m, t, *n) for (k, m, t), n in sorted(total.items())]


class UsageCounter:
    """Counts requests and tokens per (key, model, minute) and flushes them to ``store`` in batches."""

    def __init__(
        self,
        store: Store,
        *,
        flush_s: float = FLUSH_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._flush_s = flush_s
        self._clock = clock  # wall-clock UTC; injected where a test needs fixed minutes
        self._pending: dict[_Slot, list[int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    def count(
        self, key_id: str, model: str, *, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        """One finished request; O(1), no I/O. Requests with no known model are not counted."""
        if not model:
            return
        n = self._pending.setdefault((key_id, model, minute_of(self._clock())), [0, 0, 0, 0])
        n[0] += 1
        n[1] += 0 if ok else 1
        n[2] += prompt_tokens
        n[3] += completion_tokens

    def finished(self, call: FinishedCall, code: str, elapsed_s: float) -> None:
        """The edge's hook: counts a request when it ends (see ``balancer.edge.observe.Sink``)."""
        self.count(
            call.key_id,
            call.model,
            ok=code == "ok",
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
        )

    def pending(self) -> list[UsageCount]:
        """The counts not yet written to the store."""
        return [UsageCount(k, m, t, *n) for (k, m, t), n in self._pending.items()]

    async def flush(self) -> int:
        """Writes the pending counts in one transaction; returns how many rows. On failure they are kept."""
        async with self._flushing:
            taken, self._pending = self._pending, {}
            if not taken:
                return 0
            rows = [UsageCount(k, m, t, *n) for (k, m, t), n in taken.items()]
            try:
                await self._store.add_usage(rows)
            except Exception as exc:  # the store may be down: keep counting, write on a later flush
                for slot, n in taken.items():
                    mine = self._pending.setdefault(slot, [0, 0, 0, 0])
                    for i, v in enumerate(n):
                        mine[i] += v
                log.warning("usage.flush_failed", rows=len(rows), error=repr(exc))
                return 0
            return len(rows)

    async def totals(
        self,
        key_ids: Sequence[str],
        starts: Sequence[datetime],
        then: Callable[[list[dict[str, tuple[int, int]]]], None],
    ) -> None:
        """Hands ``then`` per start of ``starts``: (requests, tokens) per key of ``key_ids`` from then
        on, stored and pending together, every model added up (``balancer.edge.limits`` reads them).

        Read with no flush under way, and ``then`` runs as soon as the pending counts are added: a
        request counted meanwhile is in both or in neither, never in one alone.
        """
        async with self._flushing:
            found = [await self._store.usage_totals(key_ids, start) for start in starts]
            wanted = set(key_ids)
            for (key_id, _, minute), n in self._pending.items():
                if key_id not in wanted:
                    continue
                for start, totals in zip(starts, found, strict=True):
                    if minute >= start:
                        requests, tokens = totals.get(key_id, (0, 0))
                        totals[key_id] = (requests + n[0], tokens + n[2] + n[3])
            then(found)

    async def usage(
        self, since: datetime, *, key_id: str | None = None, model: str | None = None
    ) -> list[UsageCount]:
        """Stored and pending counts from ``since`` on, optionally of one key and one model."""
        stored = await self._store.usage(since, key_id=key_id, model=model)
        start = minute_of(since)
        fresh = [
            c
            for c in self.pending()
            if c.minute >= start and key_id in (None, c.key_id) and model in (None, c.model)
        ]
        return merged([*stored, *fresh])

    def start(self) -> None:
        """Starts the periodic flush."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def stop(self) -> None:
        """Stops the periodic flush and writes what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()


def window(
    since: datetime | None, *, default: timedelta = timedelta(days=1), now: datetime | None = None
) -> datetime:
    """``since``, or ``default`` before now when the caller gave none."""
    return since if since is not None else (now or datetime.now(UTC)) - default
