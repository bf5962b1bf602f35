"""Where a node's session tries next, and after how long, when it knows one balancer or several."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.channels import open_channel
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from node.balancers import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    FAILOVER_AT_ONCE_EVERY_S,
    BalancerChannels,
    Reattach,
)
from tests.fixtures.keyless import dead_address, keyless_balancer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reattach(count: int, clock: Clock | None = None) -> Reattach:
    return Reattach(count, clock=clock or Clock(), jitter=lambda: 1.0)


def test_a_live_session_that_breaks_moves_to_the_next_balancer_at_once() -> None:
    rule = reattach(3)
    assert rule.after(0, up_s=2.0) == (1, 0.0)


def test_failed_attempts_go_round_every_address_before_backing_off() -> None:
    rule = reattach(3)
    assert rule.after(0, up_s=None) == (1, 0.0)
    assert rule.after(1, up_s=None) == (2, 0.0)
    assert rule.after(2, up_s=None) == (0, BACKOFF_FIRST_S)  # every address failed: back off
    assert rule.after(0, up_s=None) == (1, 0.0)
    assert rule.after(1, up_s=None) == (2, 0.0)
    assert rule.after(2, up_s=None) == (0, 2 * BACKOFF_FIRST_S)  # the next round waits longer


def test_after_a_failover_the_round_ends_when_the_other_addresses_fail_too() -> None:
    rule = reattach(2)
    assert rule.after(0, up_s=30.0) == (1, 0.0)  # the replica died: straight to the other one
    assert rule.after(1, up_s=None) == (0, BACKOFF_FIRST_S)  # that one is down too: both failed


def test_sessions_that_keep_breaking_do_not_fail_over_at_once_more_than_once_in_a_while() -> None:
    clock = Clock()
    rule = reattach(2, clock)
    assert rule.after(0, up_s=0.5) == (1, 0.0)
    clock.now += 1
    assert rule.after(1, up_s=0.5) == (0, BACKOFF_FIRST_S)  # a second break so soon waits
    clock.now += FAILOVER_AT_ONCE_EVERY_S + 1
    assert rule.after(0, up_s=0.5) == (1, 0.0)


@pytest.mark.parametrize("up_s", [None, 3.0])
def test_one_address_is_retried_with_capped_exponential_backoff(up_s: float | None) -> None:
    rule = reattach(1)
    delays = [rule.after(0, up_s) for _ in range(8)]
    assert [index for index, _ in delays] == [0] * 8
    assert [delay for _, delay in delays] == [
        0.2,
        0.4,
        0.8,
        1.6,
        3.2,
        BACKOFF_MAX_S,
        BACKOFF_MAX_S,
        BACKOFF_MAX_S,
    ]


def test_a_healthy_session_starts_the_backoff_again() -> None:
    rule = reattach(1)
    for _ in range(5):
        rule.after(0, up_s=None)
    assert rule.after(0, up_s=60.0) == (0, BACKOFF_FIRST_S)


async def test_a_lookup_skips_an_address_that_does_not_answer_and_settles_only_when_asked(
    tmp_path: Path,
) -> None:
    dead = dead_address()
    async with keyless_balancer(tmp_path / "b") as live:
        channels = BalancerChannels([dead, f"127.0.0.1:{live.port}"], open_channel)
        try:

            def ask(registry: rgrpc.RegistryAsyncStub) -> Awaitable[rpb.FleetToken]:
                return registry.GetFleetToken(rpb.GetFleetTokenRequest(), timeout=5)

            assert (await channels.ask(ask, settle=False)).token == live.parts.fleet_token
            assert channels.current == 0  # a session decides which balancer is current, not a lookup
            assert (await channels.ask(ask, settle=True)).token == live.parts.fleet_token
            assert channels.address == f"127.0.0.1:{live.port}"

            with pytest.raises(grpc.aio.AioRpcError) as refused:  # an answer is final, not a reason to move
                await channels.ask(
                    lambda r: r.GetModel(rpb.GetModelRequest(model_id="no-such-model"), timeout=5),
                    settle=True,
                )
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await channels.close()
