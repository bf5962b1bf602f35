"""A node's load reports how full the key/value cache of a model server it runs is (vLLM's), as its
heartbeat carries it to the balancer."""

from __future__ import annotations

from pathlib import Path

from common.types import Capability, FileFormat
from node.pool import ModelPool, PoolSettings
from node.process import pool_load
from node.runtimes.base import LoadContext, RuntimeSpec
from node.runtimes.engines import Engines
from tests.unit.runtimes.test_pool import CPU, CounterRuntime, counter_model


class ServerBacked(CounterRuntime):
    """A counter whose model server says its cache is 40 % full."""

    engine = "served"

    def __init__(self, context: LoadContext) -> None:
        super().__init__(context)

    @property
    def kv_cache_usage(self) -> float | None:
        return 0.4 if self.loaded else None


SERVED = RuntimeSpec("served", frozenset({FileFormat.OTHER}), CounterRuntime.capabilities, ServerBacked)


async def test_the_nodes_load_carries_the_fullest_model_servers_cache(tmp_path: Path) -> None:
    pool = ModelPool(CPU, PoolSettings(memory_budget_mb=1000), Engines([SERVED]))
    try:
        assert pool_load(pool).kv_cache_percent == 0.0  # nothing loaded: nothing to report
        async with pool.use(counter_model(tmp_path, "m", 10), Capability.CHAT):
            pass
        assert pool.kv_cache_usage() == {"m": 0.4}
        assert pool_load(pool).kv_cache_percent == 40.0
    finally:
        await pool.close()
