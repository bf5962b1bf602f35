"""The reconciler over small fleets: it places, keeps, re-places, backs off, books memory, explains."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from balancer.scheduler import (
    Copy,
    CopyState,
    Deployment,
    ModelNeed,
    NodeFacts,
    Plan,
    Rates,
    Reconciler,
    Remove,
)
from common.types import Backend
from tests.unit.scheduler.hardware import GB, Clock, cuda_node, gguf, gpu

SMALL = gguf("org/small-gguf", 4, required_gb=6)
BIG = gguf("org/big-gguf", 14, required_gb=20)
NEEDS = {n.model_id: n for n in (SMALL, BIG)}
RATES = Rates(load_s={(SMALL.model_id, Backend.CUDA): 3.0, (BIG.model_id, Backend.CUDA): 9.0})


def copies_of(plan: Plan, state: CopyState = CopyState.READY, at: float = 0.0) -> list[Copy]:
    return [Copy(p.model_id, p.node_id, p.device, state, since=at, placed_at=at) for p in plan.places]


def run(
    reconciler: Reconciler,
    deployments: Sequence[Deployment],
    nodes: Sequence[NodeFacts],
    copies: Sequence[Copy] = (),
    needs: dict[str, ModelNeed] = NEEDS,
) -> Plan:
    return reconciler.plan(deployments, nodes, copies, needs, rates=RATES)


def test_copies_go_where_they_are_ready_soonest_with_the_reason_written_out() -> None:
    nodes = [
        cuda_node("gpu-1", gpu(0, 24)),
        cuda_node("gpu-2", gpu(0, 24)),
        cuda_node("gpu-3", gpu(0, 24), gpu(1, 24, free_gb=10.2), on_disk=frozenset({SMALL.model_id})),
    ]
    plan = run(Reconciler(Clock()), [Deployment(SMALL.model_id, copies=2)], nodes)

    assert [(p.node_id, p.device) for p in plan.places] == [("gpu-3", 1), ("gpu-1", 0)]
    assert plan.places[0].reason == (
        "placed on gpu-3: 10.2 GB free on GPU 1, files on disk, load ~3 s (measured), ready in ~3 s est."
    )
    assert plan.places[1].reason == (  # gpu-3 holds the files: gpu-1 fetches them from that peer
        "placed on gpu-1: 24.0 GB free on GPU 0, 4.0 GB from a peer at 150 MB/s (default), "
        "load ~3 s (measured), ready in ~30 s est."
    )
    assert plan.removals == [] and plan.shortfalls == ()


def test_placed_copies_are_kept_and_a_pass_with_nothing_to_do_plans_nothing() -> None:
    clock, nodes = Clock(), [cuda_node(f"n{i}", gpu(0, 24)) for i in range(3)]
    reconciler = Reconciler(clock)
    deployments = [Deployment(SMALL.model_id, copies=2)]
    first = run(reconciler, deployments, nodes)

    clock.advance(5)
    assert run(reconciler, deployments, nodes, copies_of(first)) == Plan()
    # Copies on their way count as well: no second placement while they download.
    assert run(reconciler, deployments, nodes, copies_of(first, CopyState.DOWNLOADING)) == Plan()


def test_one_pass_books_memory_so_the_next_placement_sees_it() -> None:
    # One 24 GB GPU: the 20 GB copy goes first (largest first), then the 6 GB one no longer fits.
    nodes = [cuda_node("only", gpu(0, 24))]
    plan = run(Reconciler(Clock()), [Deployment(SMALL.model_id), Deployment(BIG.model_id)], nodes)

    assert [(p.model_id, p.node_id) for p in plan.places] == [(BIG.model_id, "only")]
    (short,) = plan.shortfalls
    assert short.model_id == SMALL.model_id and (short.wanted, short.active) == (1, 0)
    assert short.reason == "1 more wanted, no node left that passes every filter (1 by memory)"


def test_copies_still_downloading_hold_their_memory_though_the_node_does_not_report_it_yet() -> None:
    node = cuda_node("only", gpu(0, 24))
    loading = [Copy(BIG.model_id, "only", 0, CopyState.DOWNLOADING)]
    plan = run(Reconciler(Clock()), [Deployment(SMALL.model_id), Deployment(BIG.model_id)], [node], loading)
    assert plan.places == [] and plan.shortfalls[0].model_id == SMALL.model_id

    # Once loaded, the node's own figures count it (free 4 GB, 20 GB used by it): not booked twice.
    loaded = cuda_node(
        "only", gpu(0, 24, free_gb=4, used={BIG.model_id: 20 * GB}), loaded=frozenset({BIG.model_id})
    )
    ready = [Copy(BIG.model_id, "only", 0, CopyState.READY)]
    tiny = gguf("org/tiny-gguf", 1, required_gb=3)
    plan = run(
        Reconciler(Clock()),
        [Deployment(tiny.model_id), Deployment(BIG.model_id)],
        [loaded],
        ready,
        {**NEEDS, tiny.model_id: tiny},
    )
    assert [(p.model_id, p.node_id) for p in plan.places] == [(tiny.model_id, "only")]


def test_copies_on_a_node_that_went_offline_drained_or_was_removed_are_placed_elsewhere() -> None:
    clock = Clock()
    reconciler = Reconciler(clock)
    nodes = [cuda_node(f"n{i}", gpu(0, 24)) for i in range(5)]
    deployments = [Deployment(SMALL.model_id, copies=3)]
    held = copies_of(run(reconciler, deployments, nodes))
    assert sorted(c.node_id for c in held) == ["n0", "n1", "n2"]

    clock.advance(30)
    changed = [
        dataclasses.replace(nodes[0], online=False),
        dataclasses.replace(nodes[1], draining=True),
        *nodes[3:],  # n2 removed from the fleet
    ]
    plan = run(reconciler, deployments, changed, held)

    assert plan.removals == [
        Remove(SMALL.model_id, "n0", "node offline", unload=False),
        Remove(SMALL.model_id, "n1", "node draining", unload=True),
        Remove(SMALL.model_id, "n2", "node removed", unload=False),
    ]
    assert sorted(p.node_id for p in plan.places) == ["n3", "n4"]
    assert [s.active for s in plan.shortfalls] == [2]  # two nodes left in rotation for three copies


def test_a_copy_that_failed_is_tried_elsewhere_after_a_growing_backoff() -> None:
    clock = Clock()
    reconciler = Reconciler(clock, retry_base_s=10, failure_backoff_s=300)
    nodes = [cuda_node("a", gpu(0, 24), on_disk=frozenset({SMALL.model_id})), cuda_node("b", gpu(0, 24))]
    deployments = [Deployment(SMALL.model_id)]
    assert [p.node_id for p in run(reconciler, deployments, nodes).places] == ["a"]

    failed = [Copy(SMALL.model_id, "a", 0, CopyState.FAILED, since=clock.advance(20))]
    plan = run(reconciler, deployments, nodes, failed)
    assert plan.removals == [Remove(SMALL.model_id, "a", "failed to load")]
    assert plan.places == []
    assert plan.shortfalls[0].reason == "backing off after 1 failures in a row; next try in 10 s"

    clock.advance(10)
    plan = run(reconciler, deployments, nodes, failed)  # the failed copy not yet gone: counted once
    assert [p.node_id for p in plan.places] == ["b"]  # not back to "a", where its files are

    second = [Copy(SMALL.model_id, "b", 0, CopyState.FAILED, since=clock.advance(5))]
    plan = run(reconciler, deployments, nodes, second)
    assert plan.shortfalls[0].reason == "backing off after 2 failures in a row; next try in 20 s"
    clock.advance(20)
    plan = run(reconciler, deployments, nodes)
    assert plan.places == [] and "2 by backoff" in plan.shortfalls[0].reason

    clock.advance(300)  # the per-node backoff is over: "a" again, where the files are
    assert [p.node_id for p in run(reconciler, deployments, nodes).places] == ["a"]

    # It loads this time: the streak ends, so a later failure waits the first step again.
    run(
        reconciler,
        deployments,
        nodes,
        [Copy(SMALL.model_id, "a", 0, CopyState.READY, since=clock.advance(5))],
    )
    late = [Copy(SMALL.model_id, "a", 0, CopyState.FAILED, since=clock.advance(600))]
    assert (
        run(reconciler, deployments, nodes, late)
        .shortfalls[0]
        .reason.startswith("backing off after 1 failures")
    )


def test_fewer_copies_wanted_removes_the_least_advanced_ones_first() -> None:
    nodes = [cuda_node(n, gpu(0, 24)) for n in ("a", "b", "c")]
    held = [
        Copy(SMALL.model_id, "a", 0, CopyState.READY),
        Copy(SMALL.model_id, "b", 0, CopyState.DOWNLOADING),
        Copy(SMALL.model_id, "c", 0, CopyState.LOADING),
    ]
    plan = run(Reconciler(Clock()), [Deployment(SMALL.model_id, copies=1)], nodes, held)

    assert [(r.node_id, r.unload) for r in plan.removals] == [("b", True), ("c", True)]
    assert plan.removals[0].reason == "3 copies where 1 are wanted"


def test_a_copy_no_deployment_asks_for_is_unloaded() -> None:
    nodes = [cuda_node("a", gpu(0, 24))]
    plan = run(Reconciler(Clock()), [], nodes, [Copy(SMALL.model_id, "a", 0, CopyState.READY)])
    assert plan.removals == [Remove(SMALL.model_id, "a", "no deployment asks for it")]


def test_copies_spread_over_zones_before_filling_one() -> None:
    nodes = [
        cuda_node("east-1", gpu(0, 24), labels={"zone": "east"}),
        cuda_node("east-2", gpu(0, 24), labels={"zone": "east"}),
        cuda_node("west-1", gpu(0, 24), labels={"zone": "west"}),
    ]
    plan = run(Reconciler(Clock()), [Deployment(SMALL.model_id, copies=2)], nodes)
    assert sorted(p.node_id for p in plan.places) == ["east-1", "west-1"]


def test_the_selector_limits_placement_to_labelled_nodes() -> None:
    nodes = [cuda_node("plain", gpu(0, 80)), cuda_node("h100", gpu(0, 80), labels={"gpu": "h100"})]
    plan = run(Reconciler(Clock()), [Deployment(BIG.model_id, copies=2, selector={"gpu": "h100"})], nodes)
    assert [p.node_id for p in plan.places] == ["h100"]
    assert plan.shortfalls[0].reason.endswith("(1 by one-per-node, 1 by selector)")


def test_explain_lists_every_node_with_its_rule_or_its_scores_and_the_decisions() -> None:
    clock = Clock()
    reconciler = Reconciler(clock)
    nodes = [
        cuda_node("fits", gpu(0, 24), on_disk=frozenset({BIG.model_id})),
        cuda_node("also-fits", gpu(0, 48)),
        cuda_node("too-small", gpu(0, 8)),
        cuda_node("gone-dark", gpu(0, 80), online=False),
        cuda_node("other-zone", gpu(0, 80), labels={"zone": "b"}),
    ]
    deployments = [Deployment(BIG.model_id, copies=1, selector={})]
    plan = run(reconciler, deployments, nodes)
    assert [p.node_id for p in plan.places] == ["fits"]

    explained = reconciler.explain(BIG.model_id)
    assert (explained.target, explained.active) == (1, 1)
    lines = [v.text() for v in explained.nodes]
    # "fits" holds the files: a peer to fetch them from.
    assert lines[0].startswith("also-fits: #1, 48.0 GB free on GPU 0, 14.0 GB from a peer at 150 MB/s")
    assert lines[1].startswith("other-zone: #2, 80.0 GB free on GPU 0")
    assert lines[2:] == [
        "fits: excluded by one-per-node: holds a copy already",
        "gone-dark: excluded by online: offline",
        "too-small: excluded by memory: needs 20.0 GB, at most 8.0 GB free on one gpu device",
    ]
    (decision,) = explained.decisions
    assert decision.text == plan.places[0].reason and decision.estimate_s == plan.places[0].estimate.seconds


def test_each_placement_is_recorded_with_its_estimate_and_then_what_it_took() -> None:
    clock = Clock()
    reconciler = Reconciler(clock)
    nodes = [cuda_node("a", gpu(0, 24))]
    plan = run(reconciler, [Deployment(SMALL.model_id)], nodes)
    placed_at = clock.now
    estimate = plan.places[0].estimate.seconds

    ready_at = clock.advance(70)
    ready = [
        Copy(
            SMALL.model_id, "a", 0, CopyState.READY, since=ready_at, placed_at=placed_at, estimate_s=estimate
        )
    ]
    run(reconciler, [Deployment(SMALL.model_id)], nodes, ready)

    (decision,) = reconciler.decisions()
    assert (decision.estimate_s, decision.outcome, decision.actual_s) == (estimate, "ready", 70.0)


def test_a_model_missing_from_the_catalogue_is_a_shortfall_not_an_error() -> None:
    plan = run(Reconciler(Clock()), [Deployment("org/unknown-gguf")], [cuda_node("a", gpu(0, 24))])
    assert plan.places == [] and plan.shortfalls[0].reason == "the model is not in the catalogue"


def test_a_copy_that_keeps_failing_backs_off_longer_though_another_copy_serves() -> None:
    clock = Clock()
    reconciler = Reconciler(clock, retry_base_s=10, failure_backoff_s=30)
    nodes = [cuda_node(n, gpu(0, 24)) for n in ("a", "b", "c")]
    deployments = [Deployment(SMALL.model_id, copies=2)]
    serving = Copy(SMALL.model_id, "a", 0, CopyState.READY)

    run(
        reconciler,
        deployments,
        nodes,
        [serving, Copy(SMALL.model_id, "b", 0, CopyState.FAILED, since=clock.now)],
    )
    clock.advance(10)
    assert [p.node_id for p in run(reconciler, deployments, nodes, [serving]).places] == ["c"]
    failed_again = Copy(SMALL.model_id, "c", 0, CopyState.FAILED, since=clock.advance(1))
    plan = run(reconciler, deployments, nodes, [serving, failed_again])
    assert plan.shortfalls[0].reason == "backing off after 2 failures in a row; next try in 20 s"


def test_without_a_catalogue_figure_the_need_is_estimated_per_node_from_its_context_settings() -> None:
    unsized = gguf("org/unsized-gguf", 10)  # 10 GiB of files: 11,264 MB of weights, plus the context
    nodes = [
        cuda_node("short-ctx", gpu(0, 16), context_mb=512),
        cuda_node("long-ctx", gpu(0, 16), context_mb=6_000),
    ]
    plan = run(
        Reconciler(Clock()),
        [Deployment(unsized.model_id, copies=2)],
        nodes,
        needs={unsized.model_id: unsized},
    )

    assert [(p.node_id, p.need_mb) for p in plan.places] == [("short-ctx", 11_264 + 512)]
    assert plan.shortfalls[0].reason.endswith("(1 by memory, 1 by one-per-node)")
