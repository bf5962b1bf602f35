"""Scale to zero and back on real processes: a balancer, `xllm` nodes, the real gemma model.

A ``--min 0 --max 2`` deployment with a short idle time: after the idle time no copy is loaded (the
files stay); the next chat request waits for a copy and is answered (its latency printed as the cold
start); a burst adds the second copy; idle again, both go. And eight concurrent requests for a model no
node has yet all wait on one download. No request gets a 503 (or any refusal) along the way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from common.pb.llmlb.v1 import types_pb2 as pb
from devkit.fake_hub import FakeHub
from devkit.model_files import ModelFiles
from tests.fixtures.eventually import eventually
from tests.integration.conftest import BalancerProcess, NodeProcess, wait_online
from tests.integration.test_deployments import GEMMA, GEMMA_FILE, GEMMA_REPO, cli, holders

pytestmark = pytest.mark.slow
NodeFactory = Callable[..., NodeProcess]
BalancerFactory = Callable[..., BalancerProcess]

FAST = {
    "LLMLB_HEARTBEAT_INTERVAL_MS": "200",
    "LLMLB_HEARTBEAT_TIMEOUT_MS": "1500",
    "LLMLB_SCHEDULE_INTERVAL": "0.5",
}
IDLE_S = 3.0


def loaded(balancer: BalancerProcess) -> set[str]:
    """Nodes with gemma loaded (pinned or not)."""
    return {node for node, (state, _) in holders(balancer).items() if state == pb.MODEL_STATE_READY}


def pinned(balancer: BalancerProcess) -> set[str]:
    """Nodes keeping a copy of gemma for its deployment, in any state."""
    return {node for node, (_, kept) in holders(balancer).items() if kept}


def timed_chat(balancer: BalancerProcess) -> tuple[int, float]:
    """One chat request: its status and how long its answer took."""
    started = time.monotonic()
    (status,) = asyncio.run(chats(balancer, 1, 4))
    return status, time.monotonic() - started


async def chats(
    balancer: BalancerProcess, count: int, max_tokens: int, *, stream: bool = False, spread_s: float = 0.0
) -> list[int]:
    """``count`` concurrent chat requests, sent ``spread_s`` apart; their HTTP statuses (a stream is
    read to its end)."""
    headers = {"Authorization": f"Bearer {balancer.admin_key}"}
    body = {
        "model": GEMMA,
        "messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }

    async def one(client: httpx.AsyncClient, index: int) -> int:
        await asyncio.sleep(index * spread_s)  # arrivals apart, all in flight together
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as reply:
            text = (await reply.aread()).decode()
            assert reply.status_code != 200 or ("[DONE]" in text if stream else "choices" in text), text
            return reply.status_code

    async with httpx.AsyncClient(base_url=balancer.http_url, timeout=60) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(count))))


@pytest.mark.timeout(120)
def test_eight_concurrent_requests_for_a_model_no_node_has_wait_on_one_download(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles
) -> None:
    data = gemma.paths[GEMMA_FILE].read_bytes()
    hub.add_repo(GEMMA_REPO, {GEMMA_FILE: data})
    hub.set_throttle(len(data) // 4)  # the download takes about four seconds
    balancer = balancer_factory(hub, **FAST)
    node = node_factory(balancer, hub)
    wait_online(balancer, node)

    started = time.monotonic()
    # Spread over a second: the later ones arrive while the node reports the download under way.
    statuses = asyncio.run(chats(balancer, 8, 4, spread_s=0.15))
    print(f"\neight requests answered {time.monotonic() - started:.1f} s after they were sent")
    assert statuses == [200] * 8, balancer.log()
    assert hub.bytes_served(GEMMA_REPO, GEMMA_FILE) == len(data)


@pytest.mark.timeout(180)
def test_a_min_zero_deployment_scales_to_zero_and_back_with_every_request_answered(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles
) -> None:
    hub.add_repo(GEMMA_REPO, {GEMMA_FILE: gemma.paths[GEMMA_FILE].read_bytes()})
    balancer = balancer_factory(hub, **FAST, LLMLB_SCALE_DOWN_IDLE=str(IDLE_S), LLMLB_SCALE_UP_WINDOW="1")
    nodes = [node_factory(balancer, hub), node_factory(balancer, hub)]
    wait_online(balancer, *nodes)
    statuses: list[int] = []

    assert "deployed gemma-3-270m" in cli(balancer, "models", "deploy", GEMMA, "--min", "0", "--max", "2")
    status, first = timed_chat(balancer)  # no copy anywhere: placed, fetched and loaded for it
    statuses.append(status)
    assert status == 200, balancer.log()
    (holder,) = loaded(balancer)

    eventually(
        lambda: not loaded(balancer) and not pinned(balancer), 30, "scaled to zero", describe=balancer.log
    )
    assert holders(balancer)[holder] == (pb.MODEL_STATE_PRESENT, False)  # unloaded, its files kept
    assert all((n.models_dir / GEMMA / GEMMA_FILE).exists() for n in nodes if n.node_id == holder)

    status, cold = timed_chat(balancer)
    statuses.append(status)
    print(
        f"\nfirst request (fetch and load) {first:.1f} s; cold start from zero (files on disk) {cold:.1f} s"
    )
    assert status == 200, balancer.log()

    burst_at = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        burst = pool.submit(asyncio.run, chats(balancer, 6, 32, stream=True))
        eventually(
            lambda: len(pinned(balancer)) == 2, 60, "a second copy for the burst", describe=balancer.log
        )
        added = time.monotonic() - burst_at
        statuses += burst.result(timeout=120)
    print(f"second copy placed {added:.1f} s into the burst, which took {time.monotonic() - burst_at:.1f} s")
    eventually(
        lambda: not loaded(balancer) and not pinned(balancer), 40, "back to zero", describe=balancer.log
    )
    assert statuses == [200] * 8
