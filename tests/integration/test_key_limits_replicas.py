"""Per-key limits across two balancer replicas sharing one PostgreSQL store: what one admitted counts
on the other once it synced (``LLMLB_KEY_LIMITS_SYNC``), and requests arriving on both at once
overshoot by no more than the documented bound (each replica: what the others admitted since it last
read their counts; here at most one more limit's worth, since each replica caps itself).

Both replicas run in this process, with an echo node attached to each; their limiters' clocks are
pinned mid-minute so that no minute boundary falls inside the test.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from devkit.fake_hub import FakeHub
from tests.fixtures.eventually import eventually_async
from tests.integration.test_replicas import Replica, admin_key, chat, one_node_on_each, start_replica

pytestmark = pytest.mark.timeout(120)
PINNED = datetime.now(UTC).replace(second=30, microsecond=0)
SYNCED_S = 5.0  # generous on a busy machine: a sync is due every second


async def limited_key(replica: Replica, rpm: int) -> tuple[str, str]:
    made = await replica.registry.CreateKey(
        rpb.CreateKeyRequest(name="app", scopes=[pb.SCOPE_API], limits=pb.KeyLimits(rpm=rpm))
    )
    return made.key.id, made.secret


async def stored_requests(replica: Replica, key_id: str) -> int:
    rows = (await replica.http.get(f"/v0/usage?key={key_id}")).json()["data"]
    return sum(int(r["requests"]) for r in rows)


async def test_a_keys_requests_per_minute_hold_across_two_replicas_within_the_documented_overshoot(
    tmp_path: Path, postgres_url: str, hub: FakeHub
) -> None:
    a = await start_replica(tmp_path / "a", postgres_url, hub)
    b = await start_replica(tmp_path / "b", postgres_url, hub, admin_key(a))
    try:
        for replica in (a, b):
            replica.balancer.parts.limits.clock = lambda: PINNED
        async with one_node_on_each((a, b)):
            # One after the other: once A's counts are in the store, B admits only what is left.
            key_id, secret = await limited_key(a, rpm=6)
            for _ in range(4):
                assert (await chat(a, key=secret)).status_code == 200

            async def all_stored() -> bool:
                return await stored_requests(b, key_id) == 4

            await eventually_async(all_stored, within=SYNCED_S, what="A's 4 requests in the store")
            on_b = [(await chat(b, key=secret)).status_code for _ in range(3)]
            assert on_b == [200, 200, 429]

            async def refused_on_a() -> bool:
                return (await chat(a, key=secret)).status_code == 429

            await eventually_async(refused_on_a, within=SYNCED_S, what="A refuses after B's requests")

            # At once on both: each replica caps itself, and may not yet see what the other admits.
            rpm = 10
            _, secret = await limited_key(a, rpm=rpm)
            replies = await asyncio.gather(*(chat(r, key=secret) for r in (a, b) for _ in range(15)))
            admitted = sum(r.status_code == 200 for r in replies)
            assert {r.status_code for r in replies} == {200, 429}
            print(f"{admitted} of 30 admitted on two replicas for a limit of {rpm} per minute")
            assert rpm <= admitted <= 2 * rpm

            async def refused_on_both() -> bool:
                return [(await chat(r, key=secret)).status_code for r in (a, b)] == [429, 429]

            await eventually_async(refused_on_both, within=SYNCED_S, what="both replicas refuse the key")
    finally:
        for replica in (a, b):
            await replica.http.aclose()
            await replica.channel.close(None)
            await replica.balancer.stop()
