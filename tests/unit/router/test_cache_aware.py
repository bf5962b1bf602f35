"""The cache-aware policy's rules, and the prefix index it reads, without sockets."""

from __future__ import annotations

import random

import pytest

from balancer.fleet.view import Fleet, NodeInfo
from balancer.router.candidates import READY, Candidate
from balancer.router.node_stats import NodeStatsTable
from balancer.router.policy import AFFINITY, HIT, LOAD, MISS, POLICIES, YIELDED, CacheAware, RouteKey
from balancer.router.prefix_index import PREDICTION_TTL_S, PrefixIndex
from common.config import ROUTING_POLICIES, load_balancer_config
from common.inference import ChatMessage
from common.prefixes import MAX_REPORTED, chat_prefixes
from tests.unit.router.conftest import FakeClock

MODEL = "gemma-3-270m"
SYSTEM = ChatMessage("system", "You are a terse assistant. " * 20)
TURN_1 = (SYSTEM, ChatMessage("user", "What is a load balancer?"))
TURN_2 = (*TURN_1, ChatMessage("assistant", "It spreads requests."), ChatMessage("user", "And a cache?"))


def node(node_id: str) -> Candidate:
    return Candidate(node_id, f"{node_id}:50051", READY)


NODES = [node("a"), node("b"), node("c")]


class Setup:
    """A fleet of three nodes, the index over it, the stats table, and a policy; loads set by hand."""

    def __init__(self, clock: FakeClock, seed: int = 0, **thresholds: float) -> None:
        self.clock = clock
        self.fleet = Fleet()
        for n in NODES:
            self.fleet.registered(NodeInfo(n.node_id, n.address))
            self.fleet.connected(n.node_id)
        self.reported: dict[str, int] = {}
        self.stats = NodeStatsTable(
            cooldown_failures=3, cooldown_s=10.0, clock=clock, reported=lambda n: self.reported.get(n, 0)
        )
        self.index = PrefixIndex(self.fleet, clock=clock)
        self.policy = CacheAware(random.Random(seed), self.index, **thresholds)  # type: ignore[arg-type]

    def holds(self, node_id: str, messages: tuple[ChatMessage, ...]) -> None:
        self.fleet.set_prefixes(node_id, MODEL, [p.hash for p in chat_prefixes(messages)])

    def busy(self, node_id: str, calls: int) -> None:
        self.stats.of(node_id).outstanding = calls

    def choose(self, messages: tuple[ChatMessage, ...], affinity: str = "", nodes: list[Candidate] = NODES):
        key = RouteKey(MODEL, tuple(chat_prefixes(messages)), affinity)
        return self.policy.choose(nodes, self.stats, key)


def test_a_hit_goes_to_the_node_holding_the_conversation(clock: FakeClock):
    s = Setup(clock)
    s.holds("b", TURN_1)

    for seed in range(10):
        s.policy = CacheAware(random.Random(seed), s.index)
        choice = s.choose(TURN_2)
        assert (choice.node.node_id, choice.outcome) == ("b", HIT)


def test_the_longest_held_prefix_wins_over_a_shorter_one(clock: FakeClock):
    s = Setup(clock)
    s.holds("a", (SYSTEM,))  # only the system prompt
    s.holds("c", TURN_1)  # the whole first turn

    assert s.choose(TURN_2).node.node_id == "c"


def test_a_partial_match_too_small_to_matter_is_a_miss(clock: FakeClock):
    s = Setup(clock)
    short_system = ChatMessage("system", "Hi.")
    long_question = ChatMessage("user", "Explain, at length: " + "why? " * 200)
    s.holds("a", (short_system,))

    choice = s.choose((short_system, long_question))

    assert choice.outcome == MISS


def test_a_miss_still_takes_the_less_loaded_of_two(clock: FakeClock):
    s = Setup(clock)
    s.busy("a", 3)
    s.busy("b", 3)

    for seed in range(10):
        s.policy = CacheAware(random.Random(seed), s.index)
        choice = s.choose(TURN_1, nodes=[node("a"), node("c")])
        assert (choice.node.node_id, choice.outcome) == ("c", MISS)


def test_equal_holders_tie_to_the_less_loaded(clock: FakeClock):
    s = Setup(clock)
    s.holds("a", TURN_1)
    s.holds("b", TURN_1)
    s.busy("a", 1)

    choice = s.choose(TURN_2)

    assert (choice.node.node_id, choice.outcome) == ("b", HIT)


def test_a_holder_a_little_busier_keeps_the_hit(clock: FakeClock):
    s = Setup(clock)
    s.holds("a", TURN_1)
    s.busy("a", 1)  # one more than the idle nodes: under the margin

    assert s.choose(TURN_2).outcome == HIT


def test_a_holder_much_busier_than_an_idle_node_yields(clock: FakeClock):
    s = Setup(clock)
    s.holds("a", TURN_1)
    s.busy("a", 2)  # two more than idle, and 3x (on calls + 1)

    choice = s.choose(TURN_2)

    assert choice.outcome == YIELDED
    assert choice.node.node_id != "a"


def test_the_guard_counts_the_load_a_node_reports_from_other_replicas(clock: FakeClock):
    s = Setup(clock)
    s.holds("a", TURN_1)
    s.reported["a"] = 4  # busy with another replica's calls; none of ours

    assert s.choose(TURN_2).outcome == YIELDED


def test_a_busy_fleet_keeps_hits_over_small_relative_differences(clock: FakeClock):
    s = Setup(clock)
    s.holds("a", TURN_1)
    s.busy("a", 6)  # two more than the others, but under twice as busy
    s.busy("b", 4)
    s.busy("c", 4)

    assert s.choose(TURN_2).outcome == HIT


def test_thresholds_are_the_constructors_to_set(clock: FakeClock):
    s = Setup(clock, yield_margin=5, yield_ratio=2.0)
    s.holds("a", TURN_1)
    s.busy("a", 4)

    assert s.choose(TURN_2).outcome == HIT


def test_a_hot_prefix_spreads_instead_of_piling_onto_one_node(clock: FakeClock):
    """Many concurrent first turns sharing one system prompt: each routed call stays in flight."""
    s = Setup(clock)
    for i in range(12):
        messages = (SYSTEM, ChatMessage("user", f"question {i}"))
        choice = s.choose(messages)
        s.index.routed(choice.node.node_id, MODEL, chat_prefixes(messages))
        s.stats.of(choice.node.node_id).outstanding += 1

    loads = sorted(s.stats.of(n.node_id).outstanding for n in NODES)
    assert loads[-1] - loads[0] <= 2, loads


def test_an_affinity_key_pins_a_miss_to_one_node(clock: FakeClock):
    s = Setup(clock)
    picks = set()
    for seed in range(10):
        s.policy = CacheAware(random.Random(seed), s.index)
        choice = s.choose(TURN_1, affinity="tenant-42")
        assert choice.outcome == AFFINITY
        picks.add(choice.node.node_id)

    assert len(picks) == 1
    keys = {s.choose(TURN_1, affinity=f"tenant-{i}").node.node_id for i in range(30)}
    assert keys == {"a", "b", "c"}  # different keys spread over the nodes


def test_an_affinity_node_much_busier_yields_like_a_hit(clock: FakeClock):
    s = Setup(clock)
    pinned = s.choose(TURN_1, affinity="tenant-42").node.node_id
    s.busy(pinned, 3)

    choice = s.choose(TURN_1, affinity="tenant-42")

    assert choice.outcome == YIELDED
    assert choice.node.node_id != pinned


def test_a_held_prefix_beats_the_affinity_key(clock: FakeClock):
    s = Setup(clock)
    pinned = s.choose(TURN_1, affinity="tenant-42").node.node_id
    holder = next(n.node_id for n in NODES if n.node_id != pinned)
    s.holds(holder, TURN_1)

    assert s.choose(TURN_2, affinity="tenant-42").node.node_id == holder


def test_requests_without_a_prompt_are_routed_by_load(clock: FakeClock):
    s = Setup(clock)
    s.busy("a", 5)

    choice = s.policy.choose([node("a"), node("b")], s.stats, None)

    assert (choice.node.node_id, choice.outcome) == ("b", LOAD)


# -- the prefix index ---------------------------------------------------------------------------


def test_a_routed_request_is_predicted_held_until_the_ttl(clock: FakeClock):
    s = Setup(clock)
    s.index.routed("c", MODEL, chat_prefixes(TURN_1))

    assert s.choose(TURN_2).node.node_id == "c"
    clock.advance(PREDICTION_TTL_S)
    assert s.choose(TURN_2).outcome == MISS


def test_a_report_replaces_the_previous_one_and_an_empty_one_forgets(clock: FakeClock):
    s = Setup(clock)
    prefixes = chat_prefixes(TURN_2)
    s.holds("a", TURN_1)
    assert s.index.held_chars("a", MODEL, prefixes) == chat_prefixes(TURN_1)[-1].chars

    s.fleet.set_prefixes("a", MODEL, [chat_prefixes((SYSTEM,))[0].hash])
    assert s.index.held_chars("a", MODEL, prefixes) == prefixes[0].chars

    s.fleet.set_prefixes("a", MODEL, [])
    assert s.index.held_chars("a", MODEL, prefixes) == 0


def test_a_report_is_capped_at_the_reported_maximum(clock: FakeClock):
    s = Setup(clock)
    s.fleet.set_prefixes("a", MODEL, range(MAX_REPORTED + 100))

    assert len(s.fleet.prefixes("a", MODEL)) == MAX_REPORTED


@pytest.mark.parametrize("forget", ["disconnected", "remove", "registered"])
def test_a_node_that_lost_its_memory_holds_nothing(clock: FakeClock, forget: str):
    """A session that ended, a removed node, a node that registered again (restarted)."""
    s = Setup(clock)
    s.holds("a", TURN_1)
    s.index.routed("a", MODEL, chat_prefixes(TURN_1))

    if forget == "registered":
        s.fleet.registered(NodeInfo("a", "a:50051"))
    else:
        getattr(s.fleet, forget)("a")

    assert s.index.held_chars("a", MODEL, chat_prefixes(TURN_2)) == 0


def test_predictions_are_bounded(clock: FakeClock):
    fleet = Fleet()
    index = PrefixIndex(fleet, clock=clock, max_predictions=5)
    for i in range(20):
        index.routed("a", MODEL, chat_prefixes((ChatMessage("user", f"q{i}"),)))

    assert len(index) == 5
    assert index.held_chars("a", MODEL, chat_prefixes((ChatMessage("user", "q19"),))) > 0
    assert index.held_chars("a", MODEL, chat_prefixes((ChatMessage("user", "q0"),))) == 0


# -- configuration ------------------------------------------------------------------------------


def test_routing_is_chosen_by_flag_or_environment_and_cache_aware_by_default(tmp_path):
    assert load_balancer_config(home=tmp_path, env={}).routing == "cache-aware"
    assert (
        load_balancer_config(home=tmp_path, env={"LLMLB_ROUTING": "Power-Of-Two"}).routing == "power-of-two"
    )
    flagged = load_balancer_config(
        home=tmp_path, routing="round-robin", env={"LLMLB_ROUTING": "power-of-two"}
    )
    assert flagged.routing == "round-robin"
    with pytest.raises(ValueError, match=r"LLMLB_ROUTING='fastest'.*cache-aware, power-of-two, round-robin"):
        load_balancer_config(home=tmp_path, env={"LLMLB_ROUTING": "fastest"})
    assert set(ROUTING_POLICIES) == set(POLICIES)
