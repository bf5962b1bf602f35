"""How fast the fleet moves and loads models: measured where it has measured, else documented defaults.

A copy's files come from the best of: the node's own disk or the shared dir (no transfer), a peer
that holds them or is fetching them, the balancer's proxy, or the origin. Defaults are this
project's own measurements on a 2-core machine (``bench/RESULTS.md``, transfers: peer 195 MB/s,
proxy 142, origin 102), rounded down; the fleet's measurements replace them as they come.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
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


DEFAULT_SOURCE_MB_S: Mapping[Source, float] = {Source.PEER: 150.0, Source.PROXY: 100.0, Source.ORIGIN: 80.0}
# Loading a model not yet measured: a fixed start (runtime, context, warm-up) plus reading its
# weights at this rate (a page-cached gguf on a CPU node; GPUs copy faster, disks may be slower).
DEFAULT_LOAD_BASE_S = 2.0
DEFAULT_LOAD_MB_S = 500.0


@dataclass(frozen=True, slots=True)
class Rates:
    """Measured transfer rates per source (MB/s) and load times per (model, backend) in seconds."""

    source_mb_s: Mapping[Source, float] = field(default_factory=dict)
    load_s: Mapping[tuple[str, Backend], float] = field(default_factory=dict)

    def rate(self, source: Source) -> float:
        """MB/s from ``source``: measured, else the default."""
        measured = self.source_mb_s.get(source, 0.0)
        return measured if measured > 0 else DEFAULT_SOURCE_MB_S.get(source, 0.0)

    def load_seconds(self, model_id: str, backend: Backend, size_bytes: int) -> float:
        """Seconds to load the model on ``backend``: measured, else estimated from its size."""
        measured = self.load_s.get((model_id, backend))
        if measured is not None:
            return measured
        return DEFAULT_LOAD_BASE_S + size_bytes / (1024 * 1024) / DEFAULT_LOAD_MB_S
