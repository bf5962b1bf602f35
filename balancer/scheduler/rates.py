"""How fast the fleet moves and loads models: measured where it has measured, else documented defaults.

A copy's files come from the best of: the node's own disk or the shared dir (no transfer), a peer
that holds them or is fetching them, the balancer's proxy, or the origin. Defaults are this
project's own measurements on a 2-core machine (``bench/RESULTS.md``, transfers: peer 195 MB/s,
proxy 142, origin 102), rounded down; the fleet's measurements replace them as they come.

The measurements are what placements actually took (:class:`RateLearner`): a copy whose files were
on the node already (its disk, the shared dir) measures the model's load time on that backend; one
whose files travelled (from a peer, the proxy or the origin) measures that source's rate, its size
over the time left once the load estimate is taken off. Nodes report bytes downloaded but not from
which source, so a download's progress teaches nothing per source; the time to ready does.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from common.types import Backend


class Source(enum.StrEnum):
    """Where a copy's files come from."""

    LOADED = "loaded"  # already in the node's memory: nothing to fetch or load
    DISK = "disk"
    SHARED = "shared"
    DOWNLOADING = "downloading"  # the node is already fetching it
    PEER = "peer"
    PROXY = "proxy"
    ORIGIN = "origin"


# How the files get there, for people.
FROM: Mapping[Source, str] = {
    Source.PEER: "from a peer",
    Source.PROXY: "from the balancer's proxy",
    Source.ORIGIN: "from the origin",
}
DEFAULT_SOURCE_MB_S: Mapping[Source, float] = {Source.PEER: 150.0, Source.PROXY: 100.0, Source.ORIGIN: 80.0}
# Loading a model not yet measured: a fixed start (runtime, context, warm-up) plus reading its
# weights at this rate (a page-cached gguf on a CPU node; GPUs copy faster, disks may be slower).
DEFAULT_LOAD_BASE_S = 2.0
DEFAULT_LOAD_MB_S = 500.0

# The sources whose rate is learnt: those the files travel from (a fixed set, so the rates stay bounded).
TRANSFERS = (Source.PEER, Source.PROXY, Source.ORIGIN)
# The weight of a new measurement in the smoothed value (an exponentially weighted moving average):
# one odd placement moves an estimate a third of the way, and a few that agree settle it.
EWMA_WEIGHT = 1 / 3
# A transfer is taken to have lasted at least this long when its rate is worked out, so a copy ready
# sooner than its load estimate does not teach an absurd rate.
MIN_TRANSFER_S = 1.0
# Load times kept at most (a catalogue model on a backend each); the least recently measured goes first.
LOAD_TIMES_KEPT = 1024
_MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Rates:
    """Measured transfer rates per source (MB/s) and load times per (model, backend) in seconds."""

    source_mb_s: Mapping[Source, float] = field(default_factory=dict)
    load_s: Mapping[tuple[str, Backend], float] = field(default_factory=dict)

    def measured(self, source: Source) -> bool:
        """Whether the rate from ``source`` is the fleet's measurement rather than the default."""
        return self.source_mb_s.get(source, 0.0) > 0

    def load_measured(self, model_id: str, backend: Backend) -> bool:
        """Whether the model's load time on ``backend`` is the fleet's measurement."""
        return (model_id, backend) in self.load_s

    def rate(self, source: Source) -> float:
        """MB/s from ``source``: measured, else the default."""
        measured = self.source_mb_s.get(source, 0.0)
        return measured if measured > 0 else DEFAULT_SOURCE_MB_S.get(source, 0.0)

    def load_seconds(self, model_id: str, backend: Backend, size_bytes: int) -> float:
        """Seconds to load the model on ``backend``: measured, else estimated from its size."""
        measured = self.load_s.get((model_id, backend))
        if measured is not None:
            return measured
        return DEFAULT_LOAD_BASE_S + size_bytes / _MB / DEFAULT_LOAD_MB_S


class RateLearner:
    """Smoothed measurements of what placements took (see the module's docstring), as :class:`Rates`.

    Bounded: a rate per source in ``TRANSFERS``, and at most ``kept`` load times, each of a model
    that ``keep`` (the catalogue) still knows.
    """

    def __init__(self, *, weight: float = EWMA_WEIGHT, kept: int = LOAD_TIMES_KEPT) -> None:
        self._weight = weight
        self._kept = kept
        self._source_mb_s: dict[Source, float] = {}
        self._load_s: OrderedDict[tuple[str, Backend], float] = OrderedDict()

    def rates(self) -> Rates:
        """What has been measured so far, for the next pass."""
        return Rates(dict(self._source_mb_s), dict(self._load_s))

    def learn(
        self,
        model_id: str,
        backend: Backend,
        source: Source,
        size_bytes: int,
        load_estimate_s: float,
        actual_s: float,
    ) -> str:
        """Takes in a placement ready after ``actual_s`` whose files came from ``source``: what it
        taught, for people ("" when nothing: a copy loaded already, or one joining a download)."""
        if source in (Source.DISK, Source.SHARED):
            key = (model_id, backend)
            learnt = self._load_s[key] = self._smooth(self._load_s.get(key), actual_s)
            self._load_s.move_to_end(key)
            while len(self._load_s) > self._kept:
                self._load_s.popitem(last=False)
            return f"loading {model_id} on {backend.value} takes {learnt:.1f} s (measured)"
        if source in TRANSFERS and size_bytes > 0:
            seconds = max(MIN_TRANSFER_S, actual_s - load_estimate_s)
            rate = self._source_mb_s[source] = self._smooth(
                self._source_mb_s.get(source), size_bytes / _MB / seconds
            )
            return f"files {FROM[source]} at {rate:.0f} MB/s (measured)"
        return ""

    def keep(self, known: Callable[[str], bool]) -> None:
        """Forgets the load times of models ``known`` no longer answers for (deleted from the catalogue)."""
        for key in [k for k in self._load_s if not known(k[0])]:
            del self._load_s[key]

    def _smooth(self, before: float | None, sample: float) -> float:
        return sample if before is None else before + self._weight * (sample - before)
