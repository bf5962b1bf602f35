"""Scorer: the expected seconds until a copy on this node answers; fewer is better.

Time to get the files there (none when they are on the node's disk or in the shared dir; what is
left at the download's rate when the node is already fetching them; else the size over the best
source's rate: a peer holding them, a peer fetching them, which a second fetcher joins at that
fetch's pace, the balancer's proxy, or the origin), plus the model's load time on the node's
backend (measured, else estimated; see ``balancer.scheduler.rates``). A model loaded there already
is ready now. The estimate says which figures were measured and which are defaults, and carries
what a ready copy needs to teach the rates: the source, the backend, the bytes and the load estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from balancer.scheduler.facts import MIB, NodeFacts
from balancer.scheduler.ledger import Ledger, Supply
from balancer.scheduler.rates import FROM, Rates, Source
from balancer.scheduler.rules import Ask
from common.types import Backend

_HELD = {
    Source.LOADED: "loaded already",
    Source.DISK: "files on disk",
    Source.SHARED: "files in the shared dir",
}


@dataclass(frozen=True, slots=True)
class Estimate:
    """Expected seconds until the copy answers, split into fetching and loading, and whence.

    ``fetch_bytes`` and ``rate_mb_s``: what is left to fetch and at what rate (0 when nothing is);
    ``rate_from`` and ``load_from``: whence those figures ("measured", "default", "reported" by the
    node, "the peer's pace"); ``backend``: the node's, which the load time is of.
    """

    seconds: float
    source: Source
    transfer_s: float = 0.0
    load_s: float = 0.0
    fetch_bytes: int = 0
    rate_mb_s: float = 0.0
    backend: Backend | None = None
    rate_from: str = ""
    load_from: str = ""

    @property
    def files(self) -> str:
        """How the files get there, for people: "files on disk", "4.0 GB from a peer at 150 MB/s"."""
        if self.source in _HELD:
            return _HELD[self.source]
        size = f"{self.fetch_bytes / (1024 * MIB):.1f} GB"
        rate = f"{self.rate_mb_s:.0f} MB/s ({self.rate_from})"
        if self.source is Source.DOWNLOADING:
            return f"downloading here, {size} left at {rate}"
        return f"{size} {FROM[self.source]} at {rate}"

    def text(self) -> str:
        """E.g. "files on disk, load ~4 s (measured), ready in ~4 s est."."""
        load = f", load ~{self.load_s:.0f} s ({self.load_from})" if self.load_from else ""
        return f"{self.files}{load}, ready in ~{self.seconds:.0f} s est."


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
            load_s, load_from = _load(ask, node.backend)
            return Estimate(load_s, held, 0.0, load_s, backend=node.backend, load_from=load_from)
        supply = ledger.supply(ask.need)
        download = node.downloading.get(model_id)
        if download is not None:
            left = max(0, download.total_bytes - download.done_bytes)
            if download.rate_mb_s > 0:
                rate, rate_from = download.rate_mb_s, "reported"
            else:
                fetch = self._fetch(ask, node.backend, supply)
                rate, rate_from = fetch.rate_mb_s, fetch.rate_from
            load_s, load_from = _load(ask, node.backend)
            transfer_s = left / MIB / rate
            return Estimate(
                transfer_s + load_s,
                Source.DOWNLOADING,
                transfer_s,
                load_s,
                left,
                rate,
                node.backend,
                rate_from,
                load_from,
            )
        return self._fetch(ask, node.backend, supply)

    def _fetch(self, ask: Ask, backend: Backend, supply: Supply) -> Estimate:
        """The estimate for a node with ``backend`` that must fetch every file from the best source."""
        if self._memo_ask is not ask:
            self._memo_ask, self._memo = ask, {}
        found = self._memo.get((backend, supply))
        if found is not None:
            return found
        rates, need = ask.rates, ask.need
        best, rate, rate_from = Source.ORIGIN, rates.rate(Source.ORIGIN), _whence(rates, Source.ORIGIN)
        options = [(Source.PROXY, rates.rate(Source.PROXY), _whence(rates, Source.PROXY))]
        if supply.holders:
            options.append((Source.PEER, rates.rate(Source.PEER), _whence(rates, Source.PEER)))
        elif supply.fetch_mb_s > 0:
            peer = rates.rate(Source.PEER)
            if supply.fetch_mb_s < peer:
                options.append((Source.PEER, supply.fetch_mb_s, "the peer's pace"))
            else:
                options.append((Source.PEER, peer, _whence(rates, Source.PEER)))
        for source, offered, whence in options:
            if offered > rate:
                best, rate, rate_from = source, offered, whence
        load_s, load_from = _load(ask, backend)
        transfer_s = need.size_bytes / MIB / rate
        seconds = transfer_s + load_s
        found = self._memo[(backend, supply)] = Estimate(
            seconds, best, transfer_s, load_s, need.size_bytes, rate, backend, rate_from, load_from
        )
        return found


def _whence(rates: Rates, source: Source) -> str:
    return "measured" if rates.measured(source) else "default"


def _load(ask: Ask, backend: Backend) -> tuple[float, str]:
    """The model's load time on ``backend`` and whence: "measured" or "default"."""
    model_id = ask.need.model_id
    seconds = ask.rates.load_seconds(model_id, backend, ask.need.size_bytes)
    return seconds, "measured" if ask.rates.load_measured(model_id, backend) else "default"


_LOADED = Estimate(0.0, Source.LOADED)
