"""What placements teach the rates: a copy ready from disk its model's load time, one whose files
travelled its source's rate; later estimates use what was learnt, smoothed and bounded."""

from __future__ import annotations

import pytest

from balancer.scheduler import Copy, CopyState, Deployment, NodeFacts, Plan, Reconciler
from balancer.scheduler.rates import (
    DEFAULT_LOAD_BASE_S,
    DEFAULT_LOAD_MB_S,
    MIN_TRANSFER_S,
    RateLearner,
    Source,
)
from common.types import Backend
from tests.unit.scheduler.hardware import Clock, cuda_node, gguf, gpu

SMALL = gguf("org/small-gguf", 4, required_gb=6)  # 4096 MB of files
OTHER = gguf("org/other-gguf", 2, required_gb=3)
NEEDS = {n.model_id: n for n in (SMALL, OTHER)}
DEFAULT_LOAD_S = DEFAULT_LOAD_BASE_S + 4096 / DEFAULT_LOAD_MB_S  # SMALL's load estimate, unmeasured


class Fleet:
    """A reconciler with a learner, whose passes see the placed copies become ready when told."""

    def __init__(self, *nodes: NodeFacts) -> None:
        self.clock = Clock()
        self.learner = RateLearner()
        self.reconciler = Reconciler(self.clock, learner=self.learner)
        self.nodes = list(nodes)
        self.copies: dict[str, Copy] = {}

    def run(self, copies: int) -> Plan:
        """One pass for SMALL with ``copies`` wanted, on the rates learnt so far."""
        plan = self.reconciler.plan(
            [Deployment(SMALL.model_id, copies=copies)],
            self.nodes,
            list(self.copies.values()),
            NEEDS,
            rates=self.learner.rates(),
        )
        for p in plan.places:
            placed = self.clock.now
            self.copies[p.node_id] = Copy(p.model_id, p.node_id, p.device, CopyState.LOADING, placed, placed)
        return plan

    def ready_after(self, node_id: str, seconds: float) -> str:
        """The copy on ``node_id`` is ready ``seconds`` after its placement: what that taught."""
        c = self.copies[node_id]
        ready_at = self.clock.advance(seconds)
        self.copies[node_id] = Copy(c.model_id, node_id, c.device, CopyState.READY, ready_at, c.placed_at)
        self.run(len(self.copies))
        decision = next(d for d in self.reconciler.decisions() if d.node_id == node_id)
        assert decision.actual_s == pytest.approx(seconds)
        return decision.learned


def test_a_copy_ready_from_disk_teaches_its_load_time_and_the_next_placement_estimates_with_it() -> None:
    on_disk = frozenset({SMALL.model_id})
    fleet = Fleet(cuda_node("a", gpu(0, 24), on_disk=on_disk), cuda_node("b", gpu(0, 24), on_disk=on_disk))
    (first,) = fleet.run(1).places
    assert first.estimate.source is Source.DISK
    assert first.estimate.seconds == pytest.approx(DEFAULT_LOAD_S)
    assert "files on disk, load ~10 s (default), ready in ~10 s est." in first.reason

    taught = fleet.ready_after(first.node_id, 5.0)

    assert taught == "loading org/small-gguf on cuda takes 5.0 s (measured)"
    assert fleet.learner.rates().load_s == {(SMALL.model_id, Backend.CUDA): 5.0}
    (second,) = fleet.run(2).places
    assert second.node_id != first.node_id and second.estimate.seconds == 5.0
    assert "files on disk, load ~5 s (measured), ready in ~5 s est." in second.reason
    explained = fleet.reconciler.explain(SMALL.model_id).decisions
    assert explained[0].text.endswith("; ready in 5.0 s; " + taught)


def test_a_copy_from_the_origin_teaches_the_origins_rate_which_the_next_estimate_uses() -> None:
    fleet = Fleet(*(cuda_node(n, gpu(0, 24)) for n in ("a", "b", "c")))
    # Nothing measured: the proxy's default (100 MB/s) beats the origin's (80).
    (first,) = fleet.run(1).places
    assert first.estimate.source is Source.PROXY and "at 100 MB/s (default)" in first.reason
    # It took 102.4 s more than its load estimate: the proxy moved 4096 MB at 40 MB/s.
    taught = fleet.ready_after(first.node_id, DEFAULT_LOAD_S + 102.4)
    assert taught == "files from the balancer's proxy at 40 MB/s (measured)"

    (second,) = fleet.run(2).places  # the measured proxy is slower than the origin's default now
    assert second.estimate.source is Source.ORIGIN
    assert "4.0 GB from the origin at 80 MB/s (default), load ~10 s (default)" in second.reason
    taught = fleet.ready_after(second.node_id, DEFAULT_LOAD_S + 32.0)  # 4096 MB in 32 s

    assert taught == "files from the origin at 128 MB/s (measured)"
    assert fleet.learner.rates().source_mb_s == {
        Source.PROXY: pytest.approx(40.0),
        Source.ORIGIN: pytest.approx(128.0),
    }
    (third,) = fleet.run(3).places
    assert third.estimate.source is Source.ORIGIN
    assert third.estimate.seconds == pytest.approx(4096 / 128 + DEFAULT_LOAD_S)
    assert "4.0 GB from the origin at 128 MB/s (measured)" in third.reason


def test_measurements_are_smoothed_and_a_copy_quicker_than_its_load_estimate_teaches_a_bounded_rate() -> None:
    learner = RateLearner()
    learner.learn(SMALL.model_id, Backend.CUDA, Source.DISK, 0, 0.0, 10.0)
    learner.learn(SMALL.model_id, Backend.CUDA, Source.SHARED, 0, 0.0, 40.0)
    # The second measurement moves the value a third of the way.
    assert learner.rates().load_s == {(SMALL.model_id, Backend.CUDA): pytest.approx(20.0)}

    taught = learner.learn(SMALL.model_id, Backend.CUDA, Source.PEER, 4096 * 2**20, 10.0, 3.0)
    assert learner.rates().source_mb_s == {Source.PEER: 4096 / MIN_TRANSFER_S}
    assert taught == "files from a peer at 4096 MB/s (measured)"


def test_what_is_learnt_stays_bounded_to_the_sources_and_the_catalogues_models() -> None:
    learner = RateLearner(kept=2)
    for i in range(5):
        learner.learn(f"org/m{i}", Backend.CPU, Source.DISK, 0, 0.0, float(i + 1))
    assert list(learner.rates().load_s) == [("org/m3", Backend.CPU), ("org/m4", Backend.CPU)]
    # Loaded already or joining a download in flight: no load and no source's rate to learn.
    assert learner.learn("org/m9", Backend.CPU, Source.LOADED, 0, 2.0, 0.1) == ""
    assert learner.learn("org/m9", Backend.CPU, Source.DOWNLOADING, 2**30, 2.0, 9.0) == ""
    assert learner.rates().source_mb_s == {}

    learner.keep(lambda model_id: model_id == "org/m4")  # org/m3 was deleted from the catalogue
    assert list(learner.rates().load_s) == [("org/m4", Backend.CPU)]
