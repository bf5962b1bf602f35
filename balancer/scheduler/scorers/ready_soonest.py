"""Scorer: the expected seconds until a copy on this node answers; fewer is better.

Time to get the files there (none when they are on the node's disk or in the shared dir; what is
left at the download's rate when the node is already fetching them; else the size over the best
source's rate: a peer holding them, a peer fetching them, which a second fetcher joins at that
fetch's pace, the balancer's proxy, or the origin), plus the model's load time on the node's
backend (measured, else estimated; see ``balancer.scheduler.rates``). A model loaded there already
is ready now.
"""

from __future__ import annotations

from dataclasses import dataclass

from balancer.scheduler.facts import MIB, NodeFacts
from balancer.scheduler.ledger import Ledger, Supply
from balancer.scheduler.rates import Source
from balancer.scheduler.rules import Ask
from common.types import Backend

_HELD = {
    Source.LOADED: "loaded already",
    Source.DISK: "files on disk",
    Source.SHARED: "files in the shared dir",
}
_FROM = {
    Source.PEER: "from a peer",
    Source.PROXY: "from the balancer's proxy",
    Source.ORIGIN: "from the origin",
}


@dataclass(frozen=True, slots=True)
class Estimate:
    """Expected seconds until the copy answers, split into fetching and loading, and whence.

    ``fetch_bytes`` and ``rate_mb_s``: what is left to fetch and at what rate (0 when nothing is).
    """

    seconds: float
    source: Source
    transfer_s: float = 0.0
    load_s: float = 0.0
    fetch_bytes: int = 0
    rate_mb_s: float = 0.0

    @property
    def files(self) -> str:
        """How the files get there, for people: "files on disk", "4.0 GB from a peer at 150 MB/s"."""
        if self.source in _HELD:
            return _HELD[self.source]
        size = f"{self.fetch_bytes / (1024 * MIB):.1f} GB"
        if self.source is Source.DOWNLOADING:
            return f"downloading here, {size} left at {self.rate_mb_s:.0f} MB/s"
        return f"{size} {_FROM[self.source]} at {self.rate_mb_s:.0f} MB/s"

    def text(self) -> str:
        """E.g. "files on disk, ready in ~4 s est."."""
        return f"{self.files}, ready in ~{self.seconds:.0f} s est."


class ReadySoonestScorer:
    name = "ready-soonest"

    def __init__(self) -> None:
        # A node holding none of the files gets the same estimate as any other with its backend:
        # remembered for the ask in hand, so scoring a thousand nodes costs a few real estimates.
        self._memo_ask: Ask | None = None
        self._memo: dict[tuple[Backend, Supply], Estimate] = {}

    def score(self, ask: Ask, node: NodeFacts, ledger: Ledger) -> Estimate:
        model_id = ask.need.model_id
        if model_id in node.loaded:
            return _LOADED
        held = Source.DISK if model_id in node.on_disk else Source.SHARED if model_id in node.shared else None
        if held is not None:
            load_s = ask.rates.load_seconds(model_id, node.backend, ask.need.size_bytes)
            return Estimate(load_s, held, 0.0, load_s)
        supply = ledger.supply(ask.need)
        download = node.downloading.get(model_id)
        if download is not None:
            left = max(0, download.total_bytes - download.done_bytes)
            rate = (
                download.rate_mb_s
                if download.rate_mb_s > 0
                else self._fetch(ask, node.backend, supply).rate_mb_s
            )
            load_s = ask.rates.load_seconds(model_id, node.backend, ask.need.size_bytes)
            transfer_s = left / MIB / rate
            return Estimate(transfer_s + load_s, Source.DOWNLOADING, transfer_s, load_s, left, rate)
        return self._fetch(ask, node.backend, supply)

    def _fetch(self, ask: Ask, backend: Backend, supply: Supply) -> Estimate:
        """The estimate for a node with ``backend`` that must fetch every file from the best source."""
        if self._memo_ask is not ask:
            self._memo_ask, self._memo = ask, {}
        found = self._memo.get((backend, supply))
        if found is not None:
            return found
        rates, need = ask.rates, ask.need
        best, rate = Source.ORIGIN, rates.rate(Source.ORIGIN)
        options = [(Source.PROXY, rates.rate(Source.PROXY))]
        if supply.holders:
            options.append((Source.PEER, rates.rate(Source.PEER)))
        elif supply.fetch_mb_s > 0:
            options.append((Source.PEER, min(rates.rate(Source.PEER), supply.fetch_mb_s)))
        for source, offered in options:
            if offered > rate:
                best, rate = source, offered
        load_s = rates.load_seconds(need.model_id, backend, need.size_bytes)
        transfer_s = need.size_bytes / MIB / rate
        found = self._memo[(backend, supply)] = Estimate(
            transfer_s + load_s, best, transfer_s, load_s, need.size_bytes, rate
        )
        return found


_LOADED = Estimate(0.0, Source.LOADED)
