"""Which eligible node the router picks: tiers, busy and cooling nodes, and the policies."""

from __future__ import annotations

import random

import pytest

from balancer.fleet.view import Fleet
from balancer.router.candidates import DOWNLOADABLE, ON_DISK, READY, Candidate
from balancer.router.node_stats import NodeStatsTable
from balancer.router.picking import capacity, pick
from balancer.router.policy import POLICIES, CacheAware, PowerOfTwoChoices, RoundRobin, make_policy
from balancer.router.prefix_index import PrefixIndex
from tests.unit.router.conftest import FakeClock

LIMIT = 2
COOLDOWN_FAILURES = 3
COOLDOWN_S = 10.0


def node(node_id: str, tier: int = READY) -> Candidate:
    return Candidate(node_id, f"{node_id}:50051", tier)


def nothing_held(clock: FakeClock) -> PrefixIndex:
    return PrefixIndex(Fleet(), clock=clock)


def table(clock: FakeClock) -> NodeStatsTable:
    return NodeStatsTable(cooldown_failures=COOLDOWN_FAILURES, cooldown_s=COOLDOWN_S, clock=clock)


def pick_now(
    candidates: list[Candidate],
    stats: NodeStatsTable,
    clock: FakeClock,
    exclude: set[str] | None = None,
    policy_name: str = "power-of-two",
    rng: random.Random | None = None,
) -> Candidate | None:
    policy = make_policy(policy_name, rng or random.Random(0), nothing_held(clock))
    choice = pick(candidates, exclude or set(), stats, now=clock(), max_inflight=LIMIT, policy=policy)
    return choice.node if choice is not None else None


# -- tiers and busy nodes --------------------------------------------------------------------------


def test_the_best_tier_wins_over_a_less_loaded_worse_tier(clock: FakeClock):
    stats = table(clock)
    stats.of("ready").outstanding = LIMIT - 1
    candidates = [node("ready", READY), node("disk", ON_DISK), node("fetch", DOWNLOADABLE)]

    picks = {pick_now(candidates, stats, clock, rng=random.Random(seed)) for seed in range(20)}

    assert picks == {candidates[0]}


def test_a_node_at_its_in_flight_limit_is_skipped(clock: FakeClock):
    stats = table(clock)
    stats.of("ready").outstanding = LIMIT
    candidates = [node("ready", READY), node("disk", ON_DISK)]

    assert pick_now(candidates, stats, clock) == candidates[1]


def test_every_node_busy_picks_none_so_the_request_queues(clock: FakeClock):
    stats = table(clock)
    for name in ("a", "b"):
        stats.of(name).outstanding = LIMIT

    assert pick_now([node("a"), node("b")], stats, clock) is None


def test_a_node_this_request_already_tried_is_not_picked_again(clock: FakeClock):
    stats = table(clock)
    candidates = [node("tried", READY), node("other", ON_DISK)]

    assert pick_now(candidates, stats, clock, exclude={"tried"}) == candidates[1]
    assert pick_now(candidates, stats, clock, exclude={"tried", "other"}) is None


# -- cooldown ------------------------------------------------------------------------------------


def test_consecutive_faults_cool_a_node_down_until_the_cooldown_expires(clock: FakeClock):
    stats = table(clock)
    candidates = [node("flaky", READY), node("spare", ON_DISK)]
    for _ in range(COOLDOWN_FAILURES - 1):
        stats.faulted("flaky")
    assert pick_now(candidates, stats, clock) == candidates[0]  # not yet

    stats.faulted("flaky")
    assert pick_now(candidates, stats, clock) == candidates[1]
    clock.advance(COOLDOWN_S - 0.01)
    assert pick_now(candidates, stats, clock) == candidates[1]
    clock.advance(0.01)
    assert pick_now(candidates, stats, clock) == candidates[0]


def test_an_answer_between_faults_starts_the_count_again(clock: FakeClock):
    stats = table(clock)
    candidates = [node("flaky", READY), node("spare", ON_DISK)]
    for _ in range(COOLDOWN_FAILURES - 1):
        stats.faulted("flaky")
    stats.answered("flaky", 0.01)
    stats.faulted("flaky")

    assert stats.of("flaky").failures == 1
    assert pick_now(candidates, stats, clock) == candidates[0]


def test_when_every_node_is_cooling_down_one_is_still_tried(clock: FakeClock):
    stats = table(clock)
    candidates = [node("a", READY), node("b", ON_DISK)]
    for name in ("a", "b"):
        for _ in range(COOLDOWN_FAILURES):
            stats.faulted(name)

    assert pick_now(candidates, stats, clock) == candidates[0]


def test_answers_pull_a_nodes_latency_average_towards_them(clock: FakeClock):
    stats = table(clock)
    before = stats.of("n").latency_s

    stats.answered("n", 1.0)

    assert before < stats.of("n").latency_s < 1.0


# -- policies ------------------------------------------------------------------------------------


def test_power_of_two_choices_takes_the_lower_score_of_the_two_drawn(clock: FakeClock):
    stats = table(clock)
    fast, middling, slow = node("fast"), node("middling"), node("slow")
    stats.of("fast").latency_s = 0.01
    stats.of("middling").latency_s = 0.05
    stats.of("slow").latency_s = 0.2
    tier = [fast, middling, slow]
    policy = PowerOfTwoChoices(random.Random(42), nothing_held(clock))
    draws = random.Random(42)  # the same seed: the same pairs, drawn here to know what was offered

    for _ in range(50):
        a, b = draws.sample(tier, 2)
        lower = a if stats.score(a.node_id) <= stats.score(b.node_id) else b

        assert policy.choose(tier, stats, None).node == lower


def test_power_of_two_choices_takes_the_node_with_fewer_calls_however_fast_the_busy_one(clock: FakeClock):
    stats = table(clock)
    stats.of("fast-but-busy").latency_s = 0.01
    stats.of("fast-but-busy").outstanding = 1
    stats.of("slower-idle").latency_s = 5.0  # its last answers were slow: long prompts, say
    tier = [node("fast-but-busy"), node("slower-idle")]

    picks = {
        PowerOfTwoChoices(random.Random(seed), nothing_held(clock)).choose(tier, stats, None).node
        for seed in range(20)
    }

    assert picks == {tier[1]}


def test_round_robin_takes_the_nodes_in_turn(clock: FakeClock):
    stats = table(clock)
    stats.of("a").latency_s = 5.0  # load and latency do not matter to it
    tier = [node("a"), node("b"), node("c")]
    policy = RoundRobin(random.Random(0), nothing_held(clock))

    assert [policy.choose(tier, stats, None).node.node_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_policies_are_chosen_by_name(clock: FakeClock):
    assert set(POLICIES) == {"cache-aware", "power-of-two", "round-robin"}
    assert isinstance(make_policy("round-robin", random.Random(0), nothing_held(clock)), RoundRobin)
    assert isinstance(make_policy("cache-aware", random.Random(0), nothing_held(clock)), CacheAware)
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        make_policy("fastest", random.Random(0), nothing_held(clock))


def test_a_node_busy_with_other_replicas_calls_scores_by_what_it_reports(clock: FakeClock):
    """Another balancer replica's calls are invisible here; the node's own report shows them."""
    reported = {"busy-elsewhere": 9, "idle": 0}
    stats = NodeStatsTable(cooldown_failures=3, cooldown_s=10.0, clock=clock, reported=reported.__getitem__)
    tier = [node("busy-elsewhere"), node("idle")]
    stats.of("idle").outstanding = 2  # our own calls count when they are more than it reported

    assert stats.score("busy-elsewhere") == (9, stats.of("busy-elsewhere").latency_s)
    assert stats.score("idle") == (2, stats.of("idle").latency_s)
    picks = {
        PowerOfTwoChoices(random.Random(seed), nothing_held(clock)).choose(tier, stats, None).node
        for seed in range(20)
    }
    assert picks == {tier[1]}


def test_a_report_counts_only_the_calls_of_others_so_a_node_we_just_finished_with_is_idle_at_once(
    clock: FakeClock,
):
    """A report is up to a heartbeat old; our own calls in it are counted from our own, current tally."""
    reported = {"n1": 0}
    stats = NodeStatsTable(cooldown_failures=3, cooldown_s=10.0, clock=clock, reported=reported.__getitem__)
    ours = stats.of("n1")
    ours.outstanding = 1
    reported["n1"] = 1  # the node reports our one call...
    stats.reported_now("n1")
    ours.outstanding = 0  # ...which then ends, before the next report
    assert stats.load("n1") == 0

    ours.outstanding = 1
    reported["n1"] = 4  # three calls from other replicas besides ours
    stats.reported_now("n1")
    assert stats.load("n1") == 4
    ours.outstanding = 2  # one more of ours since: the others' three still count
    assert stats.load("n1") == 5
    assert stats.score("n1") == (5, ours.latency_s)


# -- slots the nodes report ----------------------------------------------------------------------

MODEL = "org/tiny"


def reporting(node_id: str, slots: int) -> Candidate:
    """A node with the model loaded that reported ``slots`` sequences at once for it."""
    return Candidate(node_id, f"{node_id}:50051", READY, slots)


def pick_for(
    candidates: list[Candidate],
    stats: NodeStatsTable,
    clock: FakeClock,
    *,
    model_id: str = MODEL,
    max_inflight: int = 8,
    queue_allowance: int = 0,
) -> Candidate | None:
    policy = make_policy("power-of-two", random.Random(0), nothing_held(clock))
    choice = pick(
        candidates,
        set(),
        stats,
        now=clock(),
        max_inflight=max_inflight,
        policy=policy,
        model_id=model_id,
        queue_allowance=queue_allowance,
    )
    return choice.node if choice is not None else None


def route(
    candidates: list[Candidate],
    stats: NodeStatsTable,
    clock: FakeClock,
    *,
    max_inflight: int = 8,
    queue_allowance: int = 0,
) -> str | None:
    """Picks a node for one more call to ``MODEL`` and books the call there, as the router does."""
    node = pick_for(candidates, stats, clock, max_inflight=max_inflight, queue_allowance=queue_allowance)
    if node is not None:
        stats.started(node.node_id, MODEL)
    return node.node_id if node is not None else None


def test_a_node_reporting_four_slots_takes_four_calls_and_the_fifth_goes_to_another_node(clock: FakeClock):
    stats = table(clock)
    four, other = reporting("four", 4), reporting("other", 4)
    stats.of("other").latency_s = 1.0  # slower: "four" is preferred while it has room

    assert [route([four], stats, clock) for _ in range(4)] == ["four"] * 4
    assert route([four], stats, clock) is None  # alone, the fifth waits in the queue
    assert route([four, other], stats, clock) == "other"  # with another node, it goes there


def test_the_fifth_call_waits_until_one_of_the_four_ends(clock: FakeClock):
    stats = table(clock)
    four = reporting("four", 4)
    for _ in range(4):
        route([four], stats, clock)
    assert route([four], stats, clock) is None

    stats.ended("four", MODEL)

    assert route([four], stats, clock) == "four"


def test_the_queue_allowance_lets_that_many_calls_more_wait_on_the_node(clock: FakeClock):
    stats = table(clock)
    four = reporting("four", 4)

    taken = [route([four], stats, clock, queue_allowance=1) for _ in range(6)]

    assert taken == ["four"] * 5 + [None]


def test_slots_bound_the_calls_of_their_model_only(clock: FakeClock):
    """A node's slots are per loaded model: calls for another model do not take them."""
    stats = table(clock)
    two = reporting("two", 2)
    for _ in range(3):
        stats.started("two", "org/other-model")

    assert [route([two], stats, clock) for _ in range(3)] == ["two", "two", None]


def test_a_node_reporting_more_slots_than_the_node_wide_cap_takes_them_all(clock: FakeClock):
    stats = table(clock)
    wide = reporting("wide", 16)

    taken = [route([wide], stats, clock, max_inflight=8) for _ in range(17)]

    assert taken == ["wide"] * 16 + [None]


def test_a_node_reporting_no_slots_keeps_the_node_wide_cap_over_all_its_models(clock: FakeClock):
    stats = table(clock)
    old = reporting("old", 0)
    stats.started("old", "org/other-model")

    taken = [route([old], stats, clock, max_inflight=3, queue_allowance=1) for _ in range(3)]

    assert taken == ["old", "old", None]  # 1 of another model + 2 of this one reach the cap of 3


def test_capacity_is_slots_plus_the_allowance_or_the_cap_without_slots():
    assert capacity(reporting("n", 4), max_inflight=8, queue_allowance=1) == 5
    assert capacity(reporting("n", 1), max_inflight=8, queue_allowance=0) == 1
    assert capacity(reporting("n", 0), max_inflight=8, queue_allowance=1) == 8
