"""A node that reports its slots for a model gets exactly that many calls for it at once from a real
``llmlb serve`` process; the rest wait in the balancer's queue and are answered as slots free up.

The node is an echo node (``devkit.echo_node``: the real node protocol) reporting 3 slots, holding its
answers so the calls it was sent can be counted; the balancer's queue allowance is 0 so the count is the
slots exactly. ``/v0/nodes`` and ``/metrics`` show the slots the node reported.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from devkit.echo_node import EchoNode
from devkit.fake_hub import FakeHub
from tests.fixtures.eventually import eventually_async
from tests.integration.conftest import BalancerProcess

pytestmark = pytest.mark.timeout(60)
MODEL = "gemma-3-270m"
SLOTS = 3
CALLS = 7


async def reported_slots(http: httpx.AsyncClient, node_id: str) -> dict[str, int]:
    """Model id -> the slots ``/v0/nodes`` lists for it on ``node_id``."""
    nodes = (await http.get("/v0/nodes")).json()["data"]
    return {m["model_id"]: m["slots"] for n in nodes if n["id"] == node_id for m in n["models"]}


async def queue_depth(http: httpx.AsyncClient) -> float:
    found = re.search(r"^llmlb_queue_depth (\S+)$", (await http.get("/metrics")).text, re.M)
    assert found
    return float(found.group(1))


async def test_a_node_gets_as_many_calls_at_once_as_the_slots_it_reports_and_the_rest_queue(
    balancer_factory, hub: FakeHub
) -> None:
    balancer: BalancerProcess = balancer_factory(
        hub, LLMLB_NODE_QUEUE_ALLOWANCE="0", LLMLB_HEARTBEAT_INTERVAL_MS="200"
    )
    auth = {"authorization": f"Bearer {balancer.admin_key}"}
    async with (
        EchoNode(balancer.address, api_key=balancer.admin_key, node_id="three", slots=SLOTS) as node,
        httpx.AsyncClient(base_url=balancer.http_url, headers=auth, timeout=30) as http,
    ):

        async def listed() -> bool:
            return await reported_slots(http, "three") == {MODEL: SLOTS}

        await eventually_async(listed, what="the node's slots listed")
        metrics = (await http.get("/metrics")).text
        assert f'llmlb_node_model_slots{{model="{MODEL}",node="three"}} {float(SLOTS)}' in metrics

        node.hold()
        body = {"model": MODEL, "prompt": "one two three", "max_tokens": 3}
        calls = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(CALLS)]

        async def settled() -> bool:
            return node.holding == SLOTS and await queue_depth(http) == CALLS - SLOTS

        try:
            await eventually_async(settled, what=f"{SLOTS} calls on the node and the rest queued")
            assert node.most_holding == SLOTS
        finally:
            node.release()
            replies = await asyncio.gather(*calls)

        assert [r.status_code for r in replies] == [200] * CALLS
        assert node.total_calls == CALLS
        assert node.most_holding == SLOTS
