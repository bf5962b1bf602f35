"""Soak: two hundred clients keep a real balancer busy through both doors, and nothing goes missing.

The balancer is a real `llmlb serve` process; the two nodes are echo nodes (``devkit/echo_node.py``)
that speak the real node protocol and answer at once, so the balancer's own routing, queueing and both
doors are what is soaked. Every request carries a unique marker as its request id and in its prompt;
the echo answer repeats the prompt, and both the answer and the node's record of the call are matched
back to the request. ``LLMLB_SOAK_SECONDS`` sets how long it runs (default 30; more for a longer soak).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from devkit.echo_node import EchoNode
from devkit.fake_hub import FakeHub
from devkit.load_clients import GRPC, HTTP, LoadClients, Outcome, keep_sending, markers, summary
from tests.integration.conftest import BalancerProcess

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("LLMLB_SOAK_SECONDS", "30"))
CLIENTS = 200
MODEL = "gemma-3-270m"  # in the packaged catalogue; the echo nodes report it ready
DEADLINE_S = 60.0  # per request: a request past it counts as hung


def prompt_for(marker: str) -> str:
    return f"echo back {marker} please"


@pytest.mark.timeout(SECONDS + 300)
async def test_two_hundred_clients_through_both_doors_lose_and_duplicate_no_response(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    balancer: BalancerProcess = await asyncio.to_thread(balancer_factory, hub)
    nodes = [EchoNode(balancer.address, api_key=balancer.admin_key, models=(MODEL,)) for _ in range(2)]
    for node in nodes:
        await node.start()
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    try:
        async with LoadClients(
            balancer.http_url, balancer.address, balancer.admin_key, connections=CLIENTS
        ) as c:

            def via_http(marker: str) -> Coroutine[Any, Any, Outcome]:
                return c.http_complete(marker, MODEL, prompt_for(marker), deadline_s=DEADLINE_S)

            def via_grpc(marker: str) -> Coroutine[Any, Any, Outcome]:
                return c.grpc_complete(marker, MODEL, prompt_for(marker), deadline_s=DEADLINE_S)

            clients = [
                asyncio.create_task(
                    keep_sending(via_http if i % 2 else via_grpc, markers(f"c{i}"), stop, outcomes)
                )
                for i in range(CLIENTS)
            ]
            await asyncio.sleep(SECONDS)
            stop.set()
            await asyncio.gather(*clients)
    finally:
        for node in nodes:
            await node.stop()

    sent = [o.marker for o in outcomes]
    at_nodes = Counter(seen.request_id for node in nodes for seen in node.seen)
    per_node = {node.node_id: node.total_calls for node in nodes}
    seconds = sorted(o.seconds for o in outcomes)

    def latency(quantile: float) -> float:
        return seconds[min(len(seconds) - 1, int(quantile * len(seconds)))] if seconds else 0.0

    with capsys.disabled():
        print(
            f"\nsoak: {len(sent)} requests from {CLIENTS} clients in {SECONDS:g}s "
            f"({len(sent) / SECONDS:.0f}/s); outcomes {summary(outcomes)}; calls per node {per_node}; "
            f"latency p50 {latency(0.5):.3f}s p99 {latency(0.99):.3f}s max {latency(1.0):.3f}s"
        )
    assert len(set(sent)) == len(sent), "a marker was sent twice"
    assert {o.door for o in outcomes} == {HTTP, GRPC}
    failed = [o for o in outcomes if not o.answered]
    assert not failed, f"{len(failed)} requests failed, e.g. {failed[:3]}"
    wrong = [o for o in outcomes if not o.matched or o.text != prompt_for(o.marker)]
    assert not wrong, f"{len(wrong)} answers do not belong to their request, e.g. {wrong[:3]}"
    # Each request reached exactly one node exactly once: nothing lost on the way, nothing run twice.
    assert set(at_nodes) == set(sent), "the nodes saw other requests than the clients sent"
    twice = {marker: n for marker, n in at_nodes.items() if n != 1}
    assert not twice, f"{len(twice)} requests ran more than once, e.g. {list(twice.items())[:3]}"
    assert all(per_node.values()), f"a node got no traffic: {per_node}"
