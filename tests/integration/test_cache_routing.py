"""Cache-aware routing seen from outside: a conversation's later turns go where its first turn was
computed, a hot prefix still spreads, a restarted node is not taken to hold what it lost.

One balancer in this process with both doors, and echo nodes that keep and report the prefixes of
what they answered (``devkit.echo_node``), as a llama.cpp node does.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.types import Scope
from devkit.echo_node import EchoNode
from tests.fixtures.doors import Doors, open_doors

pytestmark = pytest.mark.timeout(120)
MODEL = "gemma-3-270m"
SYSTEM = {"role": "system", "content": "You answer in one short sentence. " * 10}


@pytest.fixture
def routing() -> str:
    return "cache-aware"


@pytest.fixture
async def doors(tmp_path: Path, routing: str) -> AsyncIterator[Doors]:
    async with open_doors(tmp_path / "balancer", {"LLMLB_ROUTING": routing}) as opened:
        yield opened


def echo_node(doors: Doors, node_id: str, delay_s: float = 0.0) -> EchoNode:
    return EchoNode(
        f"127.0.0.1:{doors.balancer.port}",
        api_key=doors.secrets[Scope.ADMIN],
        node_id=node_id,
        delay_s=delay_s,
    )


@pytest.fixture
async def nodes(doors: Doors) -> AsyncIterator[list[EchoNode]]:
    started = [echo_node(doors, f"n{i}", delay_s=0.05) for i in range(3)]
    for node in started:
        await node.start()
    yield started
    for node in started:
        await node.stop()


async def chat(doors: Doors, messages: list[dict[str, str]]) -> tuple[str, str, int]:
    """The node that answered, the answer, and the cached prompt tokens it reported."""
    reply = await doors.http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages}, headers=doors.headers(Scope.API)
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    cached = (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return reply.headers["x-llmlb-node"], body["choices"][0]["message"]["content"], cached


async def conversation(doors: Doors, topic: str, turns: int = 3) -> tuple[list[str], list[int]]:
    """Runs ``turns`` turns of one conversation: the node and the cached tokens of each."""
    messages = [SYSTEM, {"role": "user", "content": f"Tell me about {topic}."}]
    where, cached = [], []
    for turn in range(turns):
        node, answer, hit = await chat(doors, messages)
        where.append(node)
        cached.append(hit)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And {turn}?"}]
    return where, cached


async def outcomes(doors: Doors, policy: str) -> Counter[str]:
    """``llmlb_route_outcomes_total`` for ``policy``, as /metrics shows it."""
    text = await doors.metrics_text()
    pattern = rf'^llmlb_route_outcomes_total\{{outcome="(\w+)",policy="{policy}"\}} (\S+)$'
    return Counter({outcome: int(float(n)) for outcome, n in re.findall(pattern, text, re.M)})


TOPICS = ["ducks", "rivers", "clocks", "salt", "kites", "bridges", "moss", "tides"]


async def test_a_conversations_later_turns_go_to_the_node_that_served_its_first(
    doors: Doors, nodes: list[EchoNode]
) -> None:
    runs = await asyncio.gather(*(conversation(doors, topic) for topic in TOPICS))

    # Eight conversations at once on three nodes: the guard may send a turn away from a node that is
    # much busier than another, and that is the only reason a turn leaves its conversation's node.
    counted = await outcomes(doors, "cache-aware")
    moved = [t for where, _ in runs for t in range(1, len(where)) if where[t] != where[t - 1]]
    assert len(moved) <= counted["yielded"], (runs, counted)
    assert sum(len(set(where)) == 1 for where, _ in runs) >= len(TOPICS) // 2, runs
    for where, cached in runs:
        stayed = [cached[t] for t in range(1, len(where)) if where[t] == where[t - 1]]
        assert all(c > 0 for c in stayed), (where, cached)  # (a first turn may find the system prompt)
    assert len({where[0] for where, _ in runs}) > 1  # first turns still spread by load
    assert counted["hit"] + counted["yielded"] >= 2 * len(TOPICS)  # no later turn was a plain miss
    text = await doors.metrics_text()
    assert re.search(
        r'^llmlb_prompt_tokens_total\{model="gemma-3-270m",node="n\d",source="cached"\} [1-9]', text, re.M
    )


@pytest.mark.parametrize("routing", ["power-of-two"])
async def test_with_power_of_two_the_later_turns_are_spread(doors: Doors, nodes: list[EchoNode]) -> None:
    runs = [await conversation(doors, topic) for topic in TOPICS]

    moved = sum(where[t] != where[0] for where, _ in runs for t in (1, 2))
    assert moved > 0
    assert sum((await outcomes(doors, "power-of-two")).values()) == 3 * len(TOPICS)


async def test_a_hot_prefix_from_many_clients_at_once_does_not_all_land_on_one_node(
    doors: Doors, nodes: list[EchoNode]
) -> None:
    for node in nodes:
        node.delay_s = 0.3  # long enough for all of them to be in flight together
    clients = 12

    replies = await asyncio.gather(
        *(chat(doors, [SYSTEM, {"role": "user", "content": f"question {i}"}]) for i in range(clients))
    )

    per_node = Counter(node for node, _, _ in replies)
    assert len(per_node) >= 2 and max(per_node.values()) <= clients // 2, per_node
    assert (await outcomes(doors, "cache-aware"))["yielded"] > 0


async def test_a_restarted_node_is_not_taken_to_hold_what_it_lost(doors: Doors) -> None:
    first, other = echo_node(doors, "first"), echo_node(doors, "other")
    await first.start()
    messages = [SYSTEM, {"role": "user", "content": "Tell me about ducks."}]
    node, answer, _ = await chat(doors, messages)  # the only node: it holds the conversation now
    assert node == "first"
    await other.start()
    later = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "And?"}]
    before = await outcomes(doors, "cache-aware")
    assert (await chat(doors, later))[0] == "first"
    assert (await outcomes(doors, "cache-aware"))["hit"] == before["hit"] + 1

    await first.stop()
    restarted = echo_node(doors, "first")  # the same node id, a fresh process: nothing held
    await restarted.start()
    before = await outcomes(doors, "cache-aware")
    _, _, cached = await chat(doors, later)

    after = await outcomes(doors, "cache-aware")
    assert cached == 0
    assert after["hit"] == before["hit"] and after["miss"] == before["miss"] + 1
    await restarted.stop()
    await other.stop()
