"""The slots a node reports for each loaded model: what its engine runs at once, read from the real pool
and carried in the heartbeat's per-model state, so the balancer sends it no more than that."""

from __future__ import annotations

import asyncio
from pathlib import Path

from common.config import load_node_config
from common.types import FileFormat, ModelOnNode, ModelState
from node.link import BalancerLink
from node.model_book import ModelBook
from node.pool import ModelPool, PoolSettings
from node.runtimes.base import RuntimeSpec
from node.runtimes.engines import Engines
from tests.fixtures.eventually import eventually_async
from tests.unit.runtimes.test_pool import COUNTER, CPU, CounterRuntime, counter_model, wait_for
from tests.unit.test_node_offer import HOST, Handler, Registry, balancer

__all__ = ["balancer"]  # the fake balancer's fixture, used below


class OneAtATime(CounterRuntime):
    """A runtime that serves one call at a time, however many slots the pool has (as diffusion does)."""

    @property
    def sequences(self) -> int:
        return 1


async def test_a_loaded_model_reports_the_pools_slots_and_nothing_before_it_is_ready(tmp_path: Path) -> None:
    pool = ModelPool(CPU, PoolSettings(slots_per_model=3), Engines([COUNTER]))  # type: ignore[list-item]
    model = counter_model(tmp_path, "a", 100)
    assert pool.slots_by_model() == {}
    try:
        loading = asyncio.create_task(pool.prefetch(model))
        await wait_for(lambda: pool.states().get("a") is not None)
        assert pool.slots_by_model() == {}  # loading: not known yet, the balancer's node-wide cap applies
        await loading

        assert pool.slots_by_model() == {"a": 3}
    finally:
        await pool.close()


async def test_a_runtime_that_runs_fewer_calls_at_once_reports_those(tmp_path: Path) -> None:
    spec = RuntimeSpec("single", frozenset({FileFormat.OTHER}), OneAtATime.capabilities, OneAtATime)
    pool = ModelPool(CPU, PoolSettings(slots_per_model=4), Engines([spec]))  # type: ignore[list-item]
    try:
        await pool.prefetch(counter_model(tmp_path, "b", 100))

        assert pool.slots_by_model() == {"b": 1}
    finally:
        await pool.close()


async def test_heartbeats_carry_each_ready_models_slots(
    tmp_path: Path, balancer: tuple[Registry, int]
) -> None:
    registry, port = balancer
    config = load_node_config(home=tmp_path, env={}, balancer=f"127.0.0.1:{port}")
    link = BalancerLink(
        config,
        HOST,
        "127.0.0.1:1",
        ModelBook(),
        Handler(),
        runtime_states=lambda: {
            "ready": ModelOnNode("", "ready", ModelState.READY),
            "loading": ModelOnNode("", "loading", ModelState.LOADING),
        },
        model_slots=lambda: {"ready": 4},
    )
    link.start()
    try:
        await eventually_async(lambda: bool(registry.heartbeats()))

        reported = {m.model_id: m.slots for m in registry.heartbeats()[-1].models}

        assert reported == {"ready": 4, "loading": 0}
    finally:
        await link.stop()
