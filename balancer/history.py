"""A short in-memory history of request metrics for the console's live charts: the last hour in
10-second buckets, fleet-wide, per model and per node.

Fed from the edge when each request ends (``finished``: O(1), no I/O, no await), read by
``GET /v0/history``. Each balancer replica keeps its own; Prometheus stays the long-term source.
Latency percentiles come from a bounded sample per bucket (the most recent ``samples`` values), so a
busy bucket costs a fixed amount of memory. A model or node has a series only while ``known`` says it
may (the catalogue holds the model, the node is registered: ``balancer.edge.labels``); the series of
a model deleted or a node removed is dropped before a new series is made and before each read, so
the number of series stays bounded by the catalogue and the fleet.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

BUCKET_S = 10
SPAN_S = 3600
SAMPLES = 256
ALL = ("all", "")


class FinishedCall(Protocol):
    """What the history reads of a finished request (``balancer.edge.observe.ObservedCall``)."""

    model: str
    node_id: str
    first_token_s: float | None
    completion_tokens: int


@dataclass(slots=True)
class Bucket:
    start: int
    requests: int = 0
    errors: int = 0
    completion_tokens: int = 0
    queue_depth: int = 0  # the most requests seen waiting for a node while this bucket was current
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    seen: int = 0  # latencies recorded, including those the bounded sample has dropped
    seen_ttft: int = 0


def _keep(sample: list[float], seen: int, value: float, cap: int) -> None:
    if len(sample) < cap:
        sample.append(value)
    else:
        sample[seen % cap] = value  # overwrite the oldest: the sample follows the bucket's latest calls


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class History:
    """Per-series rings of buckets; a series is ("all", ""), ("model", id) or ("node", id)."""

    def __init__(
        self,
        *,
        queue_depth: Callable[[], int] = lambda: 0,
        bucket_s: int = BUCKET_S,
        span_s: int = SPAN_S,
        samples: int = SAMPLES,
        clock: Callable[[], float] = time.time,
        known: Callable[[str, str], bool] = lambda kind, name: True,
    ) -> None:
        self.bucket_s = bucket_s
        self._length = max(1, span_s // bucket_s)
        self._samples = samples
        self._queue_depth = queue_depth
        self._clock = clock  # wall-clock seconds: points carry times a browser can show
        self._known = known  # whether ("model", id) or ("node", id) may have a series now
        self._series: dict[tuple[str, str], deque[Bucket]] = {}

    def _bucket(self, series: tuple[str, str], start: int) -> Bucket:
        ring = self._series.get(series)
        if ring is None:
            self._prune()  # rare (a name's first request): the old names go before a new one comes
            ring = self._series[series] = deque(maxlen=self._length)
        if not ring or ring[-1].start != start:
            ring.append(Bucket(start))
        return ring[-1]

    def finished(self, call: FinishedCall, code: str, elapsed_s: float) -> None:
        """Counts one request that ended with ``code`` ("ok" or an error code) after ``elapsed_s``."""
        start = int(self._clock()) // self.bucket_s * self.bucket_s
        depth = self._queue_depth()
        series = [ALL]
        if call.model and self._known("model", call.model):
            series.append(("model", call.model))
        if call.node_id and self._known("node", call.node_id):
            series.append(("node", call.node_id))
        for name in series:
            b = self._bucket(name, start)
            b.requests += 1
            b.errors += code != "ok"
            b.completion_tokens += call.completion_tokens
            b.queue_depth = max(b.queue_depth, depth)
            _keep(b.latencies, b.seen, elapsed_s, self._samples)
            b.seen += 1
            if call.first_token_s is not None:
                _keep(b.ttfts, b.seen_ttft, call.first_token_s, self._samples)
                b.seen_ttft += 1

    def _prune(self) -> None:
        """Drops the series of models deleted and nodes removed since they were made."""
        for series in [s for s in self._series if s != ALL and not self._known(*s)]:
            del self._series[series]

    def names(self, kind: str) -> list[str]:
        """The models or nodes with a series, sorted."""
        self._prune()
        return sorted(name for k, name in self._series if k == kind)

    def points(self, kind: str = "all", name: str = "", since: float = 0.0) -> list[dict[str, Any]]:
        """The series' buckets that start at or after ``since`` (wall-clock seconds), oldest first.

        Buckets with no requests are absent; a chart draws them as zero.
        """
        self._prune()
        ring = self._series.get((kind, name) if kind != "all" else ALL, deque())
        horizon = self._clock() - self._length * self.bucket_s
        return [
            {
                "t": b.start,
                "requests": b.requests,
                "errors": b.errors,
                "requests_per_s": round(b.requests / self.bucket_s, 3),
                "errors_per_s": round(b.errors / self.bucket_s, 3),
                "latency_p50_ms": _ms(percentile(b.latencies, 50)),
                "latency_p99_ms": _ms(percentile(b.latencies, 99)),
                "ttft_p50_ms": _ms(percentile(b.ttfts, 50)),
                "tokens_per_s": round(b.completion_tokens / self.bucket_s, 3),
                "queue_depth": b.queue_depth,
            }
            for b in list(ring)
            if b.start >= since and b.start >= horizon
        ]
