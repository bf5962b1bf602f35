"""The scheduler loop on a balancer's real parts (SQLite store, catalogue, fleet), no transport and no
sleeps: each test runs passes by hand on a clock it moves, and reads the node commands the passes
queued, as a node would receive them."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from balancer import deployments
from balancer.fleet.view import Fleet, NodeInfo, NodeLoad
from balancer.http.app import create_app
from balancer.parts import BalancerParts
from balancer.router.demand import DemandMeter
from balancer.scheduler.loop import SchedulerLoop
from balancer.scheduler.plan import Remove
from balancer.store import Store
from common.config import BalancerConfig
from common.types import Backend, CommandKind, ModelOnNode, ModelState, Scope
from tests.fixtures.balancer_parts import balancer_parts
from tests.unit.test_store import make_model, make_node

MODEL = "org/tiny-gguf"  # needs 512 MB (its catalogue entry's required_vram_mb)
BUDGETS = {"big-1": 4000, "big-2": 2000, "big-3": 1000, "small": 300}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[BalancerParts]:
    config = BalancerConfig(home=tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'llmlb.db'}")
    store = await Store.open(config.database_url)
    await store.upsert_model(make_model(MODEL))
    fleet = Fleet()
    for node_id, budget in BUDGETS.items():  # CPU nodes capped with XLLM_MEMORY_BUDGET_MB
        await store.upsert_node(make_node(node_id, backends=[Backend.CPU], gpus=[]))
        info = NodeInfo(node_id, "127.0.0.1:1", backends=(Backend.CPU,), runtimes=("llama.cpp",))
        fleet.registered(info)
        fleet.connected(node_id)
        fleet.set_load(node_id, NodeLoad(memory_total_mb=budget))
    async with balancer_parts(config, store, fleet) as built:
        yield built


async def commands(parts: BalancerParts) -> set[tuple[str, CommandKind]]:
    """(node, kind) of every command queued for ``MODEL``; cleared, as if each node acknowledged."""
    found = set()
    for node_id in BUDGETS:
        for command in await parts.store.pending_commands(node_id):
            found.add((node_id, command.kind))
            await parts.store.ack_command(command.id)
    return found


def report(parts: BalancerParts, node_id: str, state: ModelState, *, pinned: bool, error: str = "") -> None:
    parts.fleet.report(ModelOnNode(node_id, MODEL, state, error=error, memory_mb=600, pinned=pinned))


async def test_copies_go_to_nodes_that_fit_and_the_small_one_is_explained(parts: BalancerParts) -> None:
    clock = Clock()
    loop = SchedulerLoop(parts, clock=clock)
    await deployments.set_deployment(parts, deployments.DeploymentAsk(MODEL, copies=2))
    plan = await loop.run_pass()
    assert loop.acting  # alone on SQLite: it holds the lease
    placed = {p.node_id for p in plan.places}
    assert len(placed) == 2 and placed <= {"big-1", "big-2", "big-3"}
    assert await commands(parts) == {(n, CommandKind.PIN) for n in placed}
    verdicts = {v.node_id: v for v in loop.explain(MODEL).nodes}
    assert verdicts["small"].rule == "memory" and "needs 0.5 GB" in verdicts["small"].reason

    clock.now += 1  # the nodes report the copies pinned and loading: nothing more to do
    for node_id in placed:
        report(parts, node_id, ModelState.LOADING, pinned=True)
    assert (await loop.run_pass()).actions == ()
    assert await commands(parts) == set()
    assert (await deployments.get_deployment(parts, MODEL)).ready == 0
    for node_id in placed:
        report(parts, node_id, ModelState.READY, pinned=True)
    assert (await deployments.get_deployment(parts, MODEL)).ready == 2
    assert ("remove", "") not in {(e.action, e.node_id) for e in loop.events()}


async def test_a_copy_that_fails_to_load_is_unloaded_and_placed_elsewhere(parts: BalancerParts) -> None:
    clock = Clock()
    loop = SchedulerLoop(parts, clock=clock)
    await deployments.set_deployment(parts, deployments.DeploymentAsk(MODEL, copies=1))
    first = (await loop.run_pass()).places[0].node_id
    await commands(parts)
    clock.now += 1
    report(parts, first, ModelState.FAILED, pinned=False, error="load failed: out of memory")
    plan = await loop.run_pass()
    assert [(r.node_id, r.reason) for r in plan.removals] == [(first, "failed to load")]
    assert await commands(parts) == {(first, CommandKind.UNLOAD)}
    clock.now += 11  # past the first retry's backoff (10 s)
    second = (await loop.run_pass()).places[0].node_id
    assert second != first  # not retried where it failed
    assert await commands(parts) == {(second, CommandKind.PIN)}


async def test_undeploying_unloads_every_copy(parts: BalancerParts) -> None:
    clock = Clock()
    loop = SchedulerLoop(parts, clock=clock)
    await deployments.set_deployment(parts, deployments.DeploymentAsk(MODEL, copies=2))
    placed = {p.node_id for p in (await loop.run_pass()).places}
    await commands(parts)
    for node_id in placed:
        report(parts, node_id, ModelState.READY, pinned=True)
    await deployments.delete_deployment(parts, MODEL)
    clock.now += 1
    plan = await loop.run_pass()
    assert {(r.node_id, r.unload) for r in plan.removals} == {(n, True) for n in placed}
    assert await commands(parts) == {(n, CommandKind.UNLOAD) for n in placed}
    clock.now += 1  # still reported pinned until the nodes unload: not told twice
    assert (await loop.run_pass()).actions == ()


async def test_an_autoscaled_deployment_grows_with_the_requests_the_router_sees(parts: BalancerParts) -> None:
    clock = Clock()
    parts.router.demand = DemandMeter(clock)  # the router's meter on the test's clock
    loop = parts.scheduler = SchedulerLoop(parts, clock=clock)
    await deployments.set_deployment(parts, deployments.DeploymentAsk(MODEL, min_copies=1, max_copies=3))
    first = (await loop.run_pass()).places[0].node_id
    report(parts, first, ModelState.READY, pinned=True)
    for _ in range(9):  # nine requests in flight on one copy: over its four slots
        parts.router.demand.started(MODEL)
    assert (await loop.run_pass()).actions == ()  # not yet: demand must stay high for a window
    clock.now += 11
    plan = await loop.run_pass()
    assert [(s.before, s.after) for s in plan.scaling] == [(1, 2)]
    assert len(plan.places) == 1 and plan.places[0].node_id != first
    assert (await deployments.get_deployment(parts, MODEL)).desired == 2


async def test_the_console_reads_each_copy_and_each_placement_against_its_outcome(
    parts: BalancerParts,
) -> None:
    """What the console shows: every deployment with its copies' nodes and states, and the events
    with a placement's estimate, then its actual time to ready and outcome."""
    clock = Clock()
    loop = parts.scheduler = SchedulerLoop(parts, clock=clock)
    _, admin = await parts.keys.create("admin", [Scope.ADMIN])
    _, app = await parts.keys.create("app", [Scope.API])
    transport = httpx.ASGITransport(app=create_app(parts))
    async with httpx.AsyncClient(transport=transport, base_url="http://console", timeout=10) as http:
        put = await http.put(
            f"/v0/models/{MODEL}/deployment", headers={"authorization": f"Bearer {admin}"}, json={"copies": 1}
        )
        assert put.status_code == 200, put.text
        node_id = (await loop.run_pass()).places[0].node_id
        read = {"authorization": f"Bearer {app}"}  # an api key reads them
        report(parts, node_id, ModelState.LOADING, pinned=True)
        listed = (await http.get("/v0/deployments", headers=read)).json()
        assert [(d["model_id"], d["desired_copies"], d["ready_copies"]) for d in listed["data"]] == [
            (MODEL, 1, 0)
        ]
        assert listed["data"][0]["nodes"] == [{"node_id": node_id, "state": "loading", "ready": False}]

        clock.now += 3
        report(parts, node_id, ModelState.READY, pinned=True)
        await loop.run_pass()
        listed = (await http.get("/v0/deployments", headers=read)).json()
        assert listed["data"][0]["ready_copies"] == 1
        assert listed["data"][0]["nodes"] == [{"node_id": node_id, "state": "ready", "ready": True}]
        on_nodes = (await http.get("/v0/nodes", headers=read)).json()["data"]
        assert {n["id"]: [m["pinned"] for m in n["models"]] for n in on_nodes}[node_id] == [True]

        events = {e["action"]: e for e in (await http.get("/v0/events", headers=read)).json()["data"]}
        placed, ready = events["place"], events["ready"]
        assert placed["node_id"] == node_id and placed["estimate_s"] is not None and placed["estimate_s"] > 0
        assert (placed["actual_s"], placed["outcome"]) == (None, "")
        assert (ready["estimate_s"], ready["actual_s"], ready["outcome"]) == (
            placed["estimate_s"],
            3.0,
            "ready",
        )

        await deployments.delete_deployment(parts, MODEL)
        assert (await http.get("/v0/deployments", headers=read)).json()["data"] == []


async def test_a_copy_removed_after_failing_to_load_is_a_failed_outcome(parts: BalancerParts) -> None:
    clock = Clock()
    loop = SchedulerLoop(parts, clock=clock)
    await deployments.set_deployment(parts, deployments.DeploymentAsk(MODEL, copies=1))
    first = (await loop.run_pass()).places[0].node_id
    clock.now += 1
    report(parts, first, ModelState.FAILED, pinned=False, error="load failed: out of memory")
    await loop.run_pass()
    removed = [e for e in loop.events() if e.action == "remove"]
    assert [(e.node_id, e.reason, e.outcome) for e in removed] == [(first, "failed to load", "failed")]


def test_the_demand_meter_counts_requests_and_the_mean_wait_over_its_window() -> None:
    clock = Clock()
    meter = DemandMeter(clock, window_s=10.0)
    meter.started("m")
    since = meter.wait_started("m")
    assert meter.snapshot()["m"].waiting == 1
    clock.now += 3
    meter.wait_ended("m", since)
    meter.wait_ended("m", meter.wait_started("m"))  # one that did not wait
    demand = meter.snapshot()["m"]
    assert (demand.in_flight, demand.waiting, demand.queue_wait_s, demand.last_request_at) == (
        1,
        0,
        1.5,
        1000.0,
    )
    clock.now += 11  # both waits are out of the window
    meter.finished("m")
    assert meter.snapshot()["m"].queue_wait_s == 0.0 and meter.snapshot()["m"].in_flight == 0


async def test_a_copy_ready_from_disk_teaches_the_loop_the_load_time_its_next_placement_is_estimated_by(
    parts: BalancerParts,
) -> None:
    clock = Clock()
    loop = SchedulerLoop(parts, clock=clock)
    for node_id in ("big-1", "big-2"):  # the files are on these two nodes' disks
        report(parts, node_id, ModelState.PRESENT, pinned=False)
    await deployments.set_deployment(parts, deployments.DeploymentAsk(MODEL, copies=1))
    (first,) = (await loop.run_pass()).places
    assert first.node_id in {"big-1", "big-2"}
    assert "files on disk, load ~2 s (default), ready in ~2 s est." in first.reason
    await commands(parts)

    clock.now += 3  # loaded 3 s after its placement
    report(parts, first.node_id, ModelState.READY, pinned=True)
    await loop.run_pass()
    ready = [(e.node_id, e.reason) for e in loop.events() if e.action == "ready"]
    taught = "loading org/tiny-gguf on cpu takes 3.0 s (measured)"
    assert ready == [(first.node_id, f"ready in 3.0 s (estimated 2.0 s); {taught}")]

    await deployments.set_deployment(parts, deployments.DeploymentAsk(MODEL, copies=2))
    (second,) = (await loop.run_pass()).places
    assert second.node_id in {"big-1", "big-2"} - {first.node_id}
    assert "files on disk, load ~3 s (measured), ready in ~3 s est." in second.reason
    assert [e.reason for e in loop.events() if e.action == "place"][-1] == second.reason


async def test_a_min_zero_copy_goes_the_idle_setting_after_the_last_answer_ended(
    parts: BalancerParts,
) -> None:
    clock = Clock()
    parts.config = dataclasses.replace(parts.config, scale_down_idle_s=5.0)  # LLMLB_SCALE_DOWN_IDLE
    parts.router.demand = DemandMeter(clock)
    loop = parts.scheduler = SchedulerLoop(parts, clock=clock)
    await deployments.set_deployment(parts, deployments.DeploymentAsk(MODEL, min_copies=0, max_copies=1))
    assert (await loop.run_pass()).actions == ()  # nobody asks: no copy
    parts.router.demand.started(MODEL)  # a request with no copy to go to brings one at once
    (place,) = (await loop.run_pass()).places
    report(parts, place.node_id, ModelState.READY, pinned=True)
    clock.now += 100  # a long answer: idle only from its end
    parts.router.demand.finished(MODEL)
    assert (await loop.run_pass()).actions == ()
    clock.now += 4.9
    assert (await loop.run_pass()).actions == ()
    clock.now += 0.2
    plan = await loop.run_pass()
    assert [(s.before, s.after) for s in plan.scaling] == [(1, 0)]
    assert [(a.node_id, a.unload) for a in plan.actions if isinstance(a, Remove)] == [(place.node_id, True)]


async def test_a_pass_tells_the_router_the_deployed_models_and_when_a_placed_copy_is_expected_ready(
    parts: BalancerParts,
) -> None:
    clock = Clock()
    loop = parts.scheduler = SchedulerLoop(parts, clock=clock)
    deployed = parts.router.deployed
    await deployments.set_deployment(parts, deployments.DeploymentAsk(MODEL, copies=1))
    assert MODEL in deployed  # at once on the replica that set it, before any pass
    (place,) = (await loop.run_pass()).places
    assert deployed.ready_in(MODEL, clock.now) == pytest.approx(place.estimate.seconds)
    clock.now += 1
    assert deployed.ready_in(MODEL, clock.now) == pytest.approx(max(0.0, place.estimate.seconds - 1))

    deployed.cold(MODEL)  # a request found no ready copy: the next pass runs now, not in a second
    assert loop._wake.is_set()
    await deployments.delete_deployment(parts, MODEL)
    assert MODEL not in deployed
