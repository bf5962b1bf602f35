"""An internal service spreads its gRPC calls over balancer replicas with gRPC's own round_robin.

docs/operations.md shows this channel; here it runs against two balancers in this process, each on its own
store (so each answers with its own fleet token, which tells the answers apart), and both get calls.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import grpc.aio

from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from tests.fixtures.keyless import keyless_balancer

CALLS = 8


async def test_a_round_robin_channel_over_two_balancers_sends_calls_to_both(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(keyless_balancer(tmp_path / "a"))
        second = await stack.enter_async_context(keyless_balancer(tmp_path / "b"))
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
        channel = grpc.aio.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
        stack.push_async_callback(channel.close, None)
        registry = rgrpc.RegistryStub(channel)
        answers = [
            (await registry.GetFleetToken(rpb.GetFleetTokenRequest(), timeout=10)).token for _ in range(CALLS)
        ]
    tokens = {first.parts.fleet_token: "first", second.parts.fleet_token: "second"}
    assert len(tokens) == 2
    assert {tokens[t] for t in answers} == {"first", "second"}
    assert answers.count(first.parts.fleet_token) >= CALLS // 2 - 1  # spread, not all on one
