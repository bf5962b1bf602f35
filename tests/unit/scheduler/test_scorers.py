"""Each scorer alone, then the combined ranking: ready soonest (bucketed), then spread, then load."""

from __future__ import annotations

import pytest

from balancer.scheduler import Deployment, Download, Rates, Source
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.ranking import READY_BUCKET_S, Candidate, Ranking, ready_bucket
from balancer.scheduler.rules import Ask, Passed
from balancer.scheduler.scorers import Estimate, LeastLoadedScorer, ReadySoonestScorer, SpreadScorer
from common.types import Backend
from tests.unit.scheduler.hardware import GIB, cuda_node, gguf, gpu

MODEL = gguf("org/m-gguf", 10, required_gb=12)  # 10 GiB of files: 10,240 MB
MEASURED = Rates(load_s={("org/m-gguf", Backend.CUDA): 4.0})


def ask(rates: Rates = MEASURED) -> Ask:
    return Ask(Deployment(MODEL.model_id), MODEL, 1_000.0, rates)


def score(
    node_changes: dict[str, object], rates: Rates = MEASURED, others: tuple[object, ...] = ()
) -> Estimate:
    node = cuda_node("a", gpu(0, 80), **node_changes)
    ledger = Ledger([node, *others])  # type: ignore[list-item]
    return ReadySoonestScorer().score(ask(rates), node, ledger)


def test_a_loaded_model_is_ready_now_and_files_on_disk_or_shared_cost_only_the_load() -> None:
    loaded = score({"loaded": frozenset({MODEL.model_id})})
    assert (loaded.seconds, loaded.source, loaded.text()) == (
        0.0,
        Source.LOADED,
        "loaded already, ready in ~0 s est.",
    )
    on_disk = score({"on_disk": frozenset({MODEL.model_id})})
    assert (on_disk.seconds, on_disk.source, on_disk.text()) == (
        4.0,
        Source.DISK,
        "files on disk, load ~4 s (measured), ready in ~4 s est.",
    )
    shared = score({"shared": frozenset({MODEL.model_id})})
    assert (shared.seconds, shared.source, shared.files) == (4.0, Source.SHARED, "files in the shared dir")


def test_without_files_it_is_the_size_over_the_best_sources_rate_plus_the_load() -> None:
    # Nobody holds it: the proxy's default 100 MB/s beats the origin's 80.
    alone = score({})
    assert alone.source is Source.PROXY
    assert alone.seconds == pytest.approx(10_240 / 100 + 4.0)
    assert alone.text() == (
        "10.0 GB from the balancer's proxy at 100 MB/s (default), load ~4 s (measured), ready in ~106 s est."
    )

    # A peer holds it: the peer's 150 MB/s.
    holder = cuda_node("b", gpu(0, 80), on_disk=frozenset({MODEL.model_id}))
    from_peer = score({}, others=(holder,))
    assert from_peer.source is Source.PEER and from_peer.seconds == pytest.approx(10_240 / 150 + 4.0)

    # A measured origin faster than the others wins.
    fast_origin = Rates(source_mb_s={Source.ORIGIN: 400.0}, load_s=MEASURED.load_s)
    assert score({}, fast_origin).source is Source.ORIGIN


def test_an_offline_holder_is_no_source_and_a_peer_fetching_joins_at_its_pace() -> None:
    offline_holder = cuda_node("b", gpu(0, 80), online=False, on_disk=frozenset({MODEL.model_id}))
    assert score({}, others=(offline_holder,)).source is Source.PROXY

    slow = cuda_node("b", gpu(0, 80), downloading={MODEL.model_id: Download(0, 10 * GIB, 40.0)})
    assert score({}, others=(slow,)).source is Source.PROXY  # 40 MB/s is slower than the proxy
    quick = cuda_node("b", gpu(0, 80), downloading={MODEL.model_id: Download(0, 10 * GIB, 300.0)})
    joined = score({}, others=(quick,))
    assert joined.source is Source.PEER and joined.seconds == pytest.approx(10_240 / 150 + 4.0)


def test_a_node_already_downloading_it_needs_only_what_is_left() -> None:
    half = score({"downloading": {MODEL.model_id: Download(5 * GIB, 10 * GIB, 256.0)}})
    assert half.source is Source.DOWNLOADING and half.seconds == pytest.approx(5_120 / 256 + 4.0)
    assert half.files == "downloading here, 5.0 GB left at 256 MB/s (reported)"


def test_an_unmeasured_load_is_estimated_from_the_size() -> None:
    on_disk = score({"on_disk": frozenset({MODEL.model_id})}, Rates())
    assert on_disk.seconds == pytest.approx(2.0 + 10_240 / 500)


def test_spread_counts_copies_of_the_model_in_the_nodes_zone_only() -> None:
    east1, east2 = (cuda_node(n, gpu(0, 80), labels={"zone": "east"}) for n in ("e1", "e2"))
    west, plain = cuda_node("w", gpu(0, 80), labels={"zone": "west"}), cuda_node("p", gpu(0, 80))
    ledger = Ledger([east1, east2, west, plain])
    ledger.book(MODEL.model_id, east1, 0, 1)
    ledger.book("org/other", west, 0, 1)
    ledger.book(MODEL.model_id, plain, 0, 1)

    spread = SpreadScorer()
    assert [spread.score(ask(), n, ledger) for n in (east2, west, plain)] == [1, 0, 0]


def test_least_loaded_is_requests_then_copies_held() -> None:
    busy, idle = cuda_node("b", gpu(0, 80), load=3), cuda_node("i", gpu(0, 80))
    ledger = Ledger([busy, idle])
    ledger.book("org/x", idle, 0, 1)
    ledger.book("org/y", idle, 0, 1)

    scorer = LeastLoadedScorer()
    assert scorer.score(ask(), busy, ledger) == (3, 0)
    assert scorer.score(ask(), idle, ledger) == (0, 2)


def candidate(node_id: str, seconds: float, spread: int = 0, load: int = 0) -> Candidate:
    node = cuda_node(node_id, gpu(0, 80))
    return Candidate(node, Passed(node.devices[0]), Estimate(seconds, Source.DISK), spread, (load, 0))


def test_near_equal_ready_times_tie_in_one_bucket_so_spread_then_load_decide() -> None:
    assert READY_BUCKET_S == 5.0
    assert [ready_bucket(s) for s in (0.0, 4.9, 5.0, 12.0)] == [0, 0, 1, 2]

    ranked = Ranking.rank(
        [
            candidate("fast-busy", 1.0, load=5),
            candidate("fast-crowded-zone", 2.0, spread=1),
            candidate("almost-as-fast-idle", 4.0),
            candidate("slow-idle", 12.0),
        ]
    )
    assert [c.node.id for c in ranked] == [
        "almost-as-fast-idle",
        "fast-busy",
        "fast-crowded-zone",
        "slow-idle",
    ]


def test_a_faster_bucket_wins_over_spread_and_load() -> None:
    ranked = Ranking.rank(
        [candidate("idle-slow", 30.0), candidate("busy-crowded-fast", 3.0, spread=2, load=9)]
    )
    assert ranked[0].node.id == "busy-crowded-fast"
